#!/usr/bin/env bash
# Install the GGUF tooling into the environment of $PYTHON (default .venv): llama-cpp-python, built
# from its PyPI sdist for the CPU, and llama.cpp's converter (convert_hf_to_gguf.py, its conversion
# package and gguf-py) from the llama.cpp sources that same sdist vendors, into
# <env>/share/llama.cpp-convert, where moeforge looks for it. Idempotent; offline once installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
VERSION=$(sed -n 's/^llama-cpp-python==//p' envs/requirements-llamacpp.txt)
DEST=$("$PY" -c "import sys; print(sys.prefix)")/share/llama.cpp-convert

# While the build runs, a line every 30 s says how far it is: the build steps done of the total (ninja's
# "[12/98]" lines in pip's verbose output, which goes to a log), the time so far and an estimate of the time left.
progress() {
    local what=$1 log=$2 start=$SECONDS steps built total spent
    while sleep 30; do
        spent=$((SECONDS - start))
        steps=$(grep -o '\[[0-9]\+/[0-9]\+\]' "$log" | tail -n 1 | tr -d '[]' || true)
        built=${steps%/*} total=${steps#*/}
        if [ -n "$steps" ] && [ "$built" -gt 0 ]; then
            echo "setup_llamacpp: $what: $built/$total build steps ($((100 * built / total))%), $((spent / 60)) min so far," \
                "about $(( (spent * (total - built) / built + 59) / 60 )) min left" >&2
        else
            echo "setup_llamacpp: $what: $((spent / 60)) min so far (about 10 min on 2 cores)" >&2
        fi
    done
}

# Portable CPU build (no -march=native), library only: about 10 min on 2 cores.
if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "setup_llamacpp: building llama-cpp-python $VERSION for the CPU (about 10 min on 2 cores)" >&2
    build_log=$(mktemp)
    progress "building llama-cpp-python $VERSION" "$build_log" &
    beat=$!
    trap 'kill $beat 2>/dev/null' EXIT
    if ! CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PY" -m pip install -v --no-binary llama-cpp-python -r envs/requirements-llamacpp.txt >"$build_log" 2>&1; then
        tail -n 40 "$build_log" >&2
        echo "setup_llamacpp: the build failed (above: the end of its output; all of it: $build_log)" >&2
        exit 1
    fi
    kill $beat 2>/dev/null
    trap - EXIT
    rm -f "$build_log"
    echo "setup_llamacpp: llama-cpp-python $VERSION built in $(( SECONDS / 60 )) min" >&2
fi

if [ "$(cat "$DEST/VERSION" 2>/dev/null)" != "llama-cpp-python $VERSION" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
    src="llama_cpp_python-$VERSION/vendor/llama.cpp"
    tar -xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" \
        "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE"
    echo "llama-cpp-python $VERSION" > "$tmp/$src/VERSION"
    # copied beside, then renamed: an interrupted install leaves no converter that looks complete
    rm -rf "$DEST" "$DEST.new"
    mkdir -p "$(dirname "$DEST")"
    mv "$tmp/$src" "$DEST.new"
    mv "$DEST.new" "$DEST"
fi
