#!/usr/bin/env bash
# The GPU kit, run once on a CUDA machine from the repository root:   bash benchmarks/gpu/run.sh
# Needs the .gpukit/ folder beside the repo's files (wheels, the repacked llama-cpp-python sdist, the SmolLM2
# tokenizer template, 40 HellaSwag rows). Writes everything under $OUT (default ./gpu-out):
#   gpu-log.txt (pytest console)  gpu-report.json (llmgate report)  gpu-bench.json (pytest-benchmark)
#   run-log.txt (this script's whole console)  timings.txt  nvidia-smi.txt  env.txt  build-log.txt  model.txt
# Environment knobs (defaults for the GPU run):
#   GPUKIT_BUDGET=520       seconds the whole script may take; pytest gets what is left (minus a margin)
#   GPUKIT_BUILD_TIMEOUT=300  seconds the CUDA build of llama-cpp-python may take before the script gives up on it
#   GPUKIT_BUILD=cuda       cuda | cpu (CPU build, for checking the script) | skip (use an installed llama_cpp)
#   GPUKIT_CPU_CHECK=0      1: device cpu, small model, short probe (the local rehearsal of this script)
#   PYTHON=python3  GPUKIT_BUILD_PYTHON=$PYTHON (needs scikit-build-core)  GPUKIT_WORK=/tmp/llmgate-gpu  GPUKIT_SITE=/tmp/site
set -uo pipefail

T0=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KIT=$REPO/.gpukit
HERE=$REPO/benchmarks/gpu
OUT=${OUT:-$REPO/gpu-out}
PY=${PYTHON:-python3}
WORK=${GPUKIT_WORK:-/tmp/llmgate-gpu}
SITE=${GPUKIT_SITE:-/tmp/site}
CPU_CHECK=${GPUKIT_CPU_CHECK:-0}
BUDGET=${GPUKIT_BUDGET:-520}
BUILD_TIMEOUT=${GPUKIT_BUILD_TIMEOUT:-300}
BUILD=${GPUKIT_BUILD:-cuda}
SDIST=$(ls "$KIT"/llama_cpp_python-*.tar.gz 2>/dev/null | head -1)
mkdir -p "$OUT" "$WORK" "$SITE"
exec > >(tee -a "$OUT/run-log.txt") 2>&1

TIMINGS=$OUT/timings.txt
: > "$TIMINGS"
elapsed() { echo $(( $(date +%s) - T0 )); }
note() { echo "[gpukit +$(elapsed)s] $*"; }
timing() { echo "$1: $2 s" | tee -a "$TIMINGS"; }

export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1   # the plugins are named below: the same set on every machine
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

note "repo $REPO, out $OUT, python $($PY -c 'import sys; print(sys.version.split()[0])'), $(nproc) cores, cpu_check=$CPU_CHECK build=$BUILD"

# --- 1. pure-python wheels that are missing -------------------------------------------------------------
s=$(date +%s)
for pair in gguf:gguf diskcache:diskcache; do
  module=${pair%%:*}; wheel=${pair##*:}
  if $PY -c "import $module" 2>/dev/null; then
    note "$module: already importable"
  else
    if $PY -m pip install -q --no-index --no-deps --target "$SITE" "$KIT"/wheels/$wheel-*.whl; then
      note "$module: installed into $SITE"
    else  # no pip: a pure-python wheel is a zip file of the package
      $PY -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$KIT"/wheels/$wheel-*.whl "$SITE" \
        && note "$module: unzipped into $SITE (pip failed)"
    fi
  fi
done
timing "install wheels" $(( $(date +%s) - s ))

# --- 2. llama-cpp-python, built in the background while the model is written ------------------------------
cuda_cmake_args() {
  # Sets CUDA_EXTRA (CMake arguments) or CUDA_MISSING. ggml-cuda links cuBLAS and (unless GGML_CUDA_NO_VMM) the
  # driver's libcuda. A toolkit assembled from pip packages may lack cuBLAS: torch's nvidia-cublas wheel
  # (nvidia/cu13/{lib,include}) then provides it, through symlinks in $WORK/cudashim.
  CUDA_EXTRA=""; CUDA_MISSING=""
  local nvcc root shim lib inc drv so name
  nvcc=$(command -v nvcc) || { CUDA_MISSING="no nvcc on PATH"; return; }
  root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  if [ ! -f "$root/include/cuda_runtime.h" ]; then  # a wrapper script (exec /usr/local/cuda-X/bin/nvcc "$@")
    root=$(grep -o "/[^ \"']*/bin/nvcc" "$nvcc" 2>/dev/null | head -1 | sed 's#/bin/nvcc$##')
    [ -f "$root/include/cuda_runtime.h" ] || root=/usr/local/cuda
  fi
  CUDA_ROOT=$root
  CUDA_EXTRA="-DCMAKE_CUDA_COMPILER=$root/bin/nvcc -DCUDAToolkit_ROOT=$root -DGGML_CUDA_NCCL=OFF"
  export LD_LIBRARY_PATH=$root/lib64:$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  shim=$WORK/cudashim; mkdir -p "$shim/lib"
  if ! ls "$root"/lib64/libcublas.so* "$root"/lib/libcublas.so* "$root"/targets/*/lib/libcublas.so* >/dev/null 2>&1; then
    read -r lib inc < <($PY - <<'PYEOF'
import importlib.util, os, pathlib
roots = [pathlib.Path(p) for p in os.environ.get("GPUKIT_NVIDIA_DIRS", "").split(":") if p]
spec = importlib.util.find_spec("nvidia")
roots += [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
for root in roots:
    for so in sorted(root.glob("**/libcublas.so*")):
        header = next(iter(sorted(root.glob("**/cublas_v2.h"))), None)
        if header is not None:
            print(so.parent, header.parent)
            raise SystemExit
print("- -")
PYEOF
)
    if [ "$lib" = "-" ]; then CUDA_MISSING="no cuBLAS in $root nor in a python nvidia package"; return; fi
    for name in cublas cublasLt; do
      so=$(ls "$lib"/lib$name.so.* 2>/dev/null | head -1)
      [ -n "$so" ] && ln -sf "$so" "$shim/lib/lib$name.so"
    done
    CUDA_EXTRA="$CUDA_EXTRA -DCUDA_cublas_LIBRARY=$shim/lib/libcublas.so -DCUDA_cublasLt_LIBRARY=$shim/lib/libcublasLt.so"
    CUDA_EXTRA="$CUDA_EXTRA -DCMAKE_CUDA_FLAGS=-I$inc -DCMAKE_CXX_FLAGS=-I$inc"
    export LD_LIBRARY_PATH=$lib:$LD_LIBRARY_PATH
    note "cuBLAS is not in $root: using $lib (headers $inc)"
  fi
  # The driver library, for CUDA's virtual memory management; without it ggml uses its legacy memory pool.
  drv=$(ls "$root"/lib64/stubs/libcuda.so "$root"/targets/*/lib/stubs/libcuda.so /usr/lib/x86_64-linux-gnu/libcuda.so \
        /usr/lib64/libcuda.so /usr/lib/x86_64-linux-gnu/libcuda.so.1 /usr/lib64/libcuda.so.1 2>/dev/null | head -1)
  if [ -z "$drv" ]; then
    drv=$(ldconfig -p 2>/dev/null | grep -o "/[^ ]*/libcuda\.so[.0-9]*$" | head -1)
  fi
  if [ -n "$drv" ]; then
    ln -sf "$drv" "$shim/lib/libcuda.so"
    CUDA_EXTRA="$CUDA_EXTRA -DCUDA_cuda_driver_LIBRARY=$shim/lib/libcuda.so"
    note "driver library: $drv"
  else
    CUDA_EXTRA="$CUDA_EXTRA -DGGML_CUDA_NO_VMM=ON"
    note "no libcuda.so found: building with GGML_CUDA_NO_VMM=ON (legacy memory pool)"
  fi
}

COMMON_CMAKE="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
BUILD_PID=""
if [ "$BUILD" = skip ]; then
  note "llama-cpp-python: not built (GPUKIT_BUILD=skip)"
elif [ -z "$SDIST" ]; then
  note "llama-cpp-python: no sdist in $KIT"; BUILD=skip
else
  if [ "$BUILD" = cuda ]; then
    cuda_cmake_args
    [ -n "$CUDA_MISSING" ] && { note "CUDA build impossible: $CUDA_MISSING"; BUILD=skip; }
    # GGML_CUDA_FA=OFF: llama-cpp-python 0.3.36 creates contexts with flash_attn=False unless asked (the llama_cpp
    # backend never asks), so its FlashAttention kernels never run; compiling them out saves a third of the build.
    export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${GPUKIT_CUDA_ARCH:-90} -DGGML_CUDA_FA=${GPUKIT_CUDA_FA:-OFF} $COMMON_CMAKE $CUDA_EXTRA"
  else
    export CMAKE_ARGS="$COMMON_CMAKE"
  fi
  if [ "$BUILD" != skip ]; then
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
    note "building $(basename "$SDIST") ($BUILD): CMAKE_ARGS=$CMAKE_ARGS, $CMAKE_BUILD_PARALLEL_LEVEL jobs, limit ${BUILD_TIMEOUT}s"
    BUILD_START=$(date +%s)
    ( timeout "$BUILD_TIMEOUT" ${GPUKIT_BUILD_PYTHON:-$PY} -m pip install -v --no-index --no-deps --no-build-isolation --target "$SITE" "$SDIST" \
        > "$OUT/build-log.txt" 2>&1; echo $? > "$WORK/build.rc" ) &
    BUILD_PID=$!
  fi
fi

# --- machine and versions (while the build runs) ---
if command -v nvidia-smi >/dev/null; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; else echo "nvidia-smi: not available" > "$OUT/nvidia-smi.txt"; fi
head -20 "$OUT/nvidia-smi.txt"
{
  echo "date: $(date -u)"; uname -a; nproc; free -g 2>/dev/null; df -h /tmp 2>/dev/null
  command -v nvcc && nvcc --version; command -v cmake && cmake --version | head -1; command -v ninja && ninja --version
  $PY -m pip --version
  $PY - <<'EOF'
import importlib.metadata as md
for p in ("torch", "transformers", "tokenizers", "numpy", "jinja2", "scikit-build-core", "pytest", "pytest-benchmark",
          "gguf", "diskcache", "llama_cpp_python"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "absent")
try:
    import torch
    print("torch.cuda", torch.cuda.is_available(), torch.version.cuda,
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
except Exception as error:
    print("torch:", error)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --- 3. the model: llama architecture, random F16 weights, SmolLM2's tokenizer -------------------------
s=$(date +%s)
if [ "$CPU_CHECK" = 1 ]; then
  MODEL=${GPUKIT_MODEL:-$WORK/random-small-f16.gguf}; SHAPE="--layers 2 --width 512"
else
  MODEL=${GPUKIT_MODEL:-$WORK/random-1b-f16.gguf}; SHAPE=""
fi
if [ -f "$MODEL" ]; then
  note "model $MODEL exists: reused"
else
  $PY "$HERE/make_model.py" --out "$MODEL" $SHAPE 2>&1 | tee "$OUT/model.txt"
fi
timing "make model" $(( $(date +%s) - s ))
ls -la "$MODEL"

LLAMA_OK=0
if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"
  rc=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
  timing "build llama-cpp-python ($BUILD, rc $rc)" $(( $(date +%s) - BUILD_START ))
  grep -E "^\s*\[[0-9]+/[0-9]+\]" "$OUT/build-log.txt" | tail -1
  if [ "$rc" != 0 ]; then
    note "llama-cpp-python build FAILED (rc $rc; 124 = over ${BUILD_TIMEOUT}s): last lines of build-log.txt:"
    grep -v "^\s*\[[0-9]*/[0-9]*\] " "$OUT/build-log.txt" | tail -40
  fi
fi
if [ "$BUILD" != skip ] || [ "$CPU_CHECK" = 1 ]; then
  if $PY - "$BUILD" <<'EOF'
import sys, llama_cpp
gpu = llama_cpp.llama_supports_gpu_offload()
print(f"llama_cpp {llama_cpp.__version__} from {llama_cpp.__file__}, GPU offload: {gpu}")
raise SystemExit(0 if gpu or sys.argv[1] != "cuda" else 1)
EOF
  then LLAMA_OK=1; fi
fi

# --- 4. the gate run ---------------------------------------------------------------------------------------
SETS=()
for m in f16 q8 q4 hf-bf16 hf-rtn4; do
  SETS+=(--llmgate-set "models.$m.path=$MODEL")
  [ "$CPU_CHECK" = 1 ] && SETS+=(--llmgate-set "models.$m.device=cpu")
done
if [ "$CPU_CHECK" = 1 ]; then
  SETS+=(--llmgate-set limit=8 --llmgate-set speed.rounds=3 --llmgate-set speed.blocks=1
         --llmgate-set speed.max_tokens=8 --llmgate-set speed.concurrency=2)
fi
if [ "$LLAMA_OK" = 1 ]; then
  MODE="full: llama.cpp f16/q8/q4 and transformers bf16/rtn4"
  STAGE=(--stage=all)
else
  MODE="TRANSFORMERS ONLY: llama-cpp-python with CUDA is not available (see build-log.txt); baseline hf-bf16, stage rtn4"
  STAGE=(--stage=rtn4 --llmgate-set baseline=hf-bf16)
fi
echo "$MODE" > "$OUT/mode.txt"
note "gate run, $MODE"
LEFT=$(( BUDGET - $(elapsed) - 25 ))
[ "$LEFT" -lt 60 ] && LEFT=60
# The full probe (15 latency rounds x 64 tokens per model, 8 concurrent) needs about 4 minutes here; when the
# build left less, measure fewer rounds rather than lose the report.
if [ "$CPU_CHECK" != 1 ] && [ "$LEFT" -lt "${GPUKIT_FULL_NEEDS:-250}" ]; then
  if [ "$LEFT" -lt 170 ]; then
    SETS+=(--llmgate-set speed.rounds=6 --llmgate-set speed.throughput_rounds=2 --llmgate-set limit=20)
    note "only ${LEFT}s left: probe cut to 6 latency rounds, 2 throughput rounds, 20 items"
  else
    SETS+=(--llmgate-set speed.rounds=9)
    note "only ${LEFT}s left: probe cut to 9 latency rounds"
  fi
fi
note "pytest gets at most ${LEFT}s (then SIGINT: pytest writes what it has)"
s=$(date +%s)
cd "$HERE"
timeout -s INT -k 30 "$LEFT" $PY -m pytest -p pytest_benchmark.plugin -p pytest_llmgate.plugin "${STAGE[@]}" "${SETS[@]}" \
  --llmgate-report="$OUT/gpu-report.json" --benchmark-json="$OUT/gpu-bench.json" -p no:randomly -rfE \
  2>&1 | tee "$OUT/gpu-log.txt"
rc=${PIPESTATUS[0]}
cd "$REPO"
timing "pytest (rc $rc; 124 or 130 = out of time)" $(( $(date +%s) - s ))

# --- 5. summary ---------------------------------------------------------------------------------------------
$PY - "$OUT/gpu-report.json" <<'EOF' || true
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except Exception as error:
    raise SystemExit(f"no report: {error}")
for role, model in (report.get("models") or {}).items():
    speed = model.get("speed") or {}
    print(role, model.get("name") or "", "size_bytes", model.get("size_bytes"), "| latency_ms", speed.get("latency_ms"),
          "| decode tok/s", speed.get("decode_tokens_per_s"), "| throughput", speed.get("throughput"),
          "| memory", model.get("memory"))
EOF
timing "total" "$(elapsed)"
note "mode: $MODE"
note "outputs: $(ls "$OUT" | tr '\n' ' ')"
exit 0
