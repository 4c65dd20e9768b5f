#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer in its own build tree
# (build/sanitize; the regular build is left alone) and runs the op tests against it. Any report
# fails the run: ASan halts on the first error, UBSan is compiled with -fno-sanitize-recover.
#
#   scripts/sanitize.sh [pytest args...]   (default: the SANITIZE_TESTS subset below)
#
# Python itself is not instrumented, so the ASan runtime is preloaded and leak detection is off
# (the interpreter keeps memory alive until exit by design).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUILD=build/sanitize
STAGE=$BUILD/stage
VENV_BIN=$(dirname "$PY")

# only the instruction sets this CPU runs (the others could not be exercised)
ISAS=generic
grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && ISAS="$ISAS;avx2"
grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo && grep -qw avx512dq /proc/cpuinfo && ISAS="$ISAS;avx512"

"$VENV_BIN/cmake" -S . -B "$BUILD" -DFUSEDFORMER_CPU_ISAS="$ISAS" -G Ninja -DCMAKE_MAKE_PROGRAM="$(realpath "$VENV_BIN/ninja")" \
  -DPython_EXECUTABLE="$(cd "$VENV_BIN" && pwd)/$(basename "$PY")" -DFUSEDFORMER_SANITIZE=ON -DFUSEDFORMER_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
"$VENV_BIN/cmake" --build "$BUILD" -j "$(nproc)"

# A package tree with the Python sources of this checkout and the sanitized extension; tests import
# fusedformer from it (checked below).
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r python/fusedformer "$STAGE/fusedformer"
find "$STAGE/fusedformer" -name '_C*.so' -delete
cp "$BUILD"/_C*.so "$STAGE/fusedformer/"
# An editable install puts a finder ahead of sys.path; this sitecustomize (run at every interpreter
# start, child processes included) removes it so that fusedformer comes from the stage.
cat > "$STAGE/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_skbc_")]
PY

SANITIZE_TESTS=(tests/test_softmax.py tests/test_layernorm.py tests/test_gelu.py tests/test_cross_entropy.py tests/test_attention.py tests/test_attention_varlen.py tests/test_linear.py tests/test_paged_attention.py tests/test_quantized_linear.py tests/test_decode_layer.py tests/test_fuzz.py tests/test_errors_isolated.py tests/test_numerics_edges.py tests/test_concurrency.py::test_threads_match_one_thread)
if [ $# -gt 0 ]; then SANITIZE_TESTS=("$@"); fi

# libstdc++ is preloaded too: the ASan runtime looks up __cxa_throw when it starts, and the
# interpreter itself does not link libstdc++ (without it the first C++ exception aborts).
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBSTDCXX=$(gcc -print-file-name=libstdc++.so.6)
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:allocator_may_return_null=1:detect_odr_violation=0:new_delete_type_mismatch=0:alloc_dealloc_mismatch=0:handle_segv=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87"
export FUSEDFORMER_SANITIZE_STAGE="$(realpath "$STAGE")"
export PYTHONPATH="$FUSEDFORMER_SANITIZE_STAGE${PYTHONPATH:+:$PYTHONPATH}"
export FUSEDFORMER_FUZZ_EXAMPLES=${FUSEDFORMER_FUZZ_EXAMPLES:-}
"$PY" -c "import fusedformer, os, sys; f = fusedformer._C.__file__; sys.exit(f'{f} is not the sanitized build' if not f.startswith(os.environ['FUSEDFORMER_SANITIZE_STAGE']) else 0)"
# torch.compile tests are left out: inductor would build and load its own C++ under the preload
"$PY" -m pytest -q -p no:cacheprovider -k "not compile" "${SANITIZE_TESTS[@]}"
echo "sanitize: no ASan/UBSan reports"
