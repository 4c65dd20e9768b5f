#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, the CUDA toolkit (nvcc, compute-sanitizer) and a
# CUDA build of torch, without internet: builds the extension with its CUDA kernels, runs the test
# suite (CUDA cases included), compute-sanitizer memcheck and racecheck on a small script that
# runs every kernel, the kernels benchmark on the GPU, and writes a summary (device, torch,
# commit, step status, test counts, sanitizer results, benchmark table).
#
#   scripts/gpu_check.sh [--steps info,build,test,errors,bench,sanitize] [--quick] [--budget SECONDS]
#                        [--out DIR] [--commit HASH] [--pytest-args "ARGS"]
#                        [--sanitizers memcheck,racecheck] [--help]
#
# The test step runs the CUDA tests: tests/test_cuda.py and every op test's CUDA cases
# (-k cuda); errors runs scripts/cuda_error_paths.py (bad input raises, in child processes, never
# crashes). The steps run in the order info, build, test, errors, bench, sanitize.
#
# Every step runs under a time limit inside the overall budget (default 570 s, one 10-minute
# call); a step that finds too little time left is skipped, and the summary is always written.
# Outputs: DIR (default $OUT, else build/gpu-check-out) receives summary.md, summary.json,
# steps.log (every step's output), junit.xml and cuda-kernels.{md,json}; bench/results receives,
# named after the GPU (e.g. h200), cuda-GPU-kernels.{md,json} (with --quick: not), cuda-GPU-summary.md
# and cuda-GPU-gpu-check.log.
set -u -o pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

STEPS="info,build,test,errors,bench,sanitize"
QUICK=0
BUDGET=570
DEST="${OUT:-}"
COMMIT=""
PYTEST_ARGS=""
SANITIZERS="memcheck,racecheck"
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS="${2:-}"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --budget) BUDGET="${2:-}"; shift 2 ;;
    --out) DEST="${2:-}"; shift 2 ;;
    --commit) COMMIT="${2:-}"; shift 2 ;;
    --pytest-args) PYTEST_ARGS="${2:-}"; shift 2 ;;
    --sanitizers) SANITIZERS="${2:-}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for s in ${STEPS//,/ }; do
  case "$s" in
    info|build|test|errors|sanitize|bench) ;;
    *) echo "gpu_check: unknown step '$s' (steps: info, build, test, errors, bench, sanitize)" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget takes seconds, got '$BUDGET'" >&2; exit 2 ;; esac

# the commit the tree was copied from, for the benchmark files (bench/common.py)
[ -n "$COMMIT" ] && export FUSEDFORMER_SOURCE_COMMIT="$COMMIT"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WORK="$ROOT/build/gpu-check"
DEST="${DEST:-$ROOT/build/gpu-check-out}"
rm -rf "$WORK"
mkdir -p "$WORK" "$DEST"
: > "$WORK/steps.tsv"
: > "$WORK/steps.log"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=20  # seconds kept for the summary

want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# run_step NAME CAP_SECONDS COMMAND...: output appended to steps.log (and LOG if set)
run_step() {
  local name="$1" cap="$2"; shift 2
  local now left limit rc t0
  now=$(date +%s)
  left=$((DEADLINE - RESERVE - now))
  limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  t0=$(date +%s)
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, ${left}s left" | tee -a "$WORK/steps.log"
    rc=125
  else
    echo "== $name (limit ${limit}s): $*" | tee -a "$WORK/steps.log"
    timeout --kill-after=10 "$limit" "$@" >> "${LOG:-$WORK/steps.log}" 2>&1
    rc=$?
    if [ -n "${LOG:-}" ]; then cat "$LOG" >> "$WORK/steps.log"; fi
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$WORK/steps.tsv"
  echo "== $name: rc $rc" | tee -a "$WORK/steps.log"
  return $rc
}

if want info; then
  {
    echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
    echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo "torch: $($PY -c 'import torch; print(torch.__version__)' 2>/dev/null)"
    echo "cuda: $($PY -c 'import torch; print(torch.version.cuda)' 2>/dev/null)"
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
    echo "commit: ${COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpus: $(nproc)"
  } > "$WORK/info.txt"
  cat "$WORK/info.txt"
fi

# the GPU's name for file names: "NVIDIA H200" -> h200
SLUG="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' |
  sed -e 's/nvidia//' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')"
SLUG="${SLUG:-gpu}"

if want build; then
  # CUDA kernels for sm_90 (H100, H200), all cores; no network: no build isolation, no index
  LOG="" run_step build 300 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FUSEDFORMER_CUDA=ON \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    -C build-dir=build/gpu .
  LOG="" run_step import 30 "$PY" -c "import fusedformer, torch; assert fusedformer.built_with_cuda(); \
assert torch.cuda.is_available(); print('fusedformer with CUDA kernels on', torch.cuda.get_device_name())"
fi

if want test; then
  XDIST=""
  if "$PY" -c "import xdist" 2>/dev/null; then
    J=$(nproc); [ "$J" -gt 8 ] && J=8
    XDIST="-n $J"
  fi
  # shellcheck disable=SC2086
  FUSEDFORMER_TEST_ALL_ISAS=0 LOG="" run_step test 240 "$PY" -m pytest -q -p no:cacheprovider $XDIST \
    --junitxml="$WORK/junit.xml" -k cuda -rfE $PYTEST_ARGS tests
fi

if want errors; then
  LOG="" run_step errors 90 "$PY" scripts/cuda_error_paths.py --device cuda
fi

if want bench; then
  if [ "$QUICK" = 1 ]; then
    LOG="" run_step bench 150 "$PY" bench/run.py --device cuda --suite cuda --stem "cuda-$SLUG-kernels" --quick \
      --out "$WORK/bench"
    BENCH_DIR="$WORK/bench"
  else
    LOG="" run_step bench 240 "$PY" bench/run.py --device cuda --suite cuda --stem "cuda-$SLUG-kernels"
    BENCH_DIR="bench/results"
  fi
  for ext in md json; do cp "$BENCH_DIR/cuda-$SLUG-kernels.$ext" "$WORK/cuda-kernels.$ext" 2>/dev/null; done
fi

if want sanitize; then
  SAN="$(command -v compute-sanitizer || true)"
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer; do
    [ -z "$SAN" ] && [ -x "$c" ] && SAN="$c"
  done
  if [ -z "$SAN" ]; then
    echo "compute-sanitizer not found" | tee -a "$WORK/steps.log"
    printf 'sanitize\t127\t0\n' >> "$WORK/steps.tsv"
  else
    # no caching allocator: every tensor is its own allocation, so out-of-bounds accesses are seen
    for tool in ${SANITIZERS//,/ }; do
      LOG="$WORK/$tool.log" run_step "$tool" 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" \
        --print-limit 20 "$PY" scripts/cuda_smoke.py
    done
  fi
fi

# bench/results keeps the summaries of runs on a GPU only, named after the GPU
RESULTS=()
if grep -q '^device: .\+' "$WORK/info.txt" 2>/dev/null; then
  RESULTS=(--results "$ROOT/bench/results" --slug "$SLUG")
fi
"$PY" scripts/gpu_summary.py --dir "$WORK" "${RESULTS[@]}" > /dev/null
[ ${#RESULTS[@]} -gt 0 ] && cp "$WORK/steps.log" "$ROOT/bench/results/cuda-$SLUG-gpu-check.log"
for f in summary.md summary.json steps.log junit.xml cuda-kernels.md cuda-kernels.json; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$DEST/"
done
cat "$WORK/summary.md"
echo "gpu_check: $(($(date +%s) - START)) s; outputs in $DEST"
