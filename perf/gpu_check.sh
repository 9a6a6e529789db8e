#!/usr/bin/env bash
# The one script to run on a CUDA machine (no network needed), from the repository root. Stages,
# in the order given by $STAGES (default: all of them, about 8 minutes on an H100):
#   tune   perf.tune: the weight-gradient launch configs (flat and per-tap kernels, fp32, NHWC) at
#          AlexNet's real shapes vs cuDNN per GEMM ($TUNE_ARGS overrides, e.g. --kinds fwd,dgrad); compiles
#          in parallel processes first
#   check  perf.gpu_check: every kernel at batch 128 against float64 torch, then timed against
#          torch (cuDNN, cudnn.benchmark=True); whole-model checks
#   step   perf.step: the whole training step, fastalex vs eager (NCHW, channels_last) vs
#          torch.compile, fp32 and bf16, single and paper nets, with MFU
#   host   perf.host: the host's time a step around the conv stack's launches (is the eager step
#          host-bound?)
#   tests  the test suite on the GPU (tests/: small shapes, every dtype and layout)
#   bench  pytest-benchmark: `pytest perf --benchmark-only`, JSON for each kernel and layer
#   report perf.report: compute breakdown of the single and paper nets, both backends
#   dist   the distributed strategies (towers and DDP) with one GPU plus the CPU
# Each stage has its own time limit ($<STAGE>_TIMEOUT seconds), cut to what is left of the whole
# script's $BUDGET (default 470 s, so one call ends within 8 minutes); a stage with under 15 s left
# is skipped. A failing stage does not stop the rest; the exit status says whether any failed. Results go to perf/results/local/, or,
# where $OUT is set (the device tool brings back a few files from it), to a temporary folder
# packed after every stage into $OUT/results.tgz. Commit them under perf/results/<card>-<date>/.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK="${OUT:-}"
if [ -n "$PACK" ]; then OUT="$(mktemp -d)"; else OUT=perf/results/local; fi
mkdir -p "$OUT"
export OUT
PY="${PYTHON:-python3}"
STAGES="${STAGES:-tune check step host tests bench report dist}"
export PYTHONUNBUFFERED=1

# Use this checkout: an editable install maps kernels/ to fastalex.kernels.
"$PY" -m pip install --no-deps --no-build-isolation -q -e . >"$OUT/install.log" 2>&1 || {
    echo "editable install failed; see $OUT/install.log"; exit 2; }
rm -rf fastalex.egg-info build
"$PY" - <<'PY' | tee "$OUT/versions.txt"
import subprocess, torch, triton, numpy
print("card", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "triton", triton.__version__, "numpy", numpy.__version__)
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu",
                          "--format=csv"], capture_output=True, text=True).stdout)
except OSError as e:
    print("nvidia-smi:", e)
PY

status=0
BUDGET="${BUDGET:-470}"
stage() {  # stage NAME DEFAULT_TIMEOUT COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local var; var="$(echo "$name" | tr a-z A-Z)_TIMEOUT"
    limit=${!var:-$limit}
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 15 ]; then echo "=== $name: skipped, the budget of $BUDGET s is spent"; status=1; return; fi
    [ "$limit" -le "$left" ] || limit=$left
    local t0=$SECONDS
    echo "=== $name (limit $limit s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
    [ -z "$PACK" ] || tar czf "$PACK/results.tgz" -C "$OUT" .
}

for s in $STAGES; do
    case $s in
        tune) stage tune 80 "$PY" -m perf.tune --kinds wgrad_taps,wgrad --dtypes float32 --layouts nhwc --out "$OUT" \
                  ${TUNE_ARGS:-} ;;
        check) stage check 100 "$PY" -m perf.gpu_check --quick --out "$OUT" ;;
        step) stage step 140 "$PY" -m perf.step --steps 20 --out "$OUT" ${STEP_ARGS:-} ;;
        host) stage host 30 "$PY" -m perf.host --json "$OUT/host.json" ;;
        tests) stage tests 60 "$PY" -m pytest tests/test_conv2d.py tests/test_lrn.py tests/test_lrn_pool.py tests/test_maxpool2d.py \
                   tests/test_model.py -q -n 8 -p no:cacheprovider -rf --maxfail 30 --junitxml="$OUT/tests.xml" ;;
        bench) stage bench 50 "$PY" -m pytest perf/test_bench_kernels.py -q -p no:cacheprovider --benchmark-only \
                   --benchmark-max-time=0.05 --benchmark-min-rounds=5 --benchmark-json="$OUT/bench.json" ;;
        report) for v in single paper; do
                    stage "report_$v" 25 "$PY" -m perf.report --device cuda --backend both --batch-size 128 \
                        --variant "$v" --json "$OUT/report_$v.json" --markdown "$OUT/report_$v.md"
                done ;;
        dist) stage dist 40 "$PY" -m perf.dist_check --out "$OUT" ;;
        *) echo "unknown stage $s"; status=1 ;;
    esac
done
exit $status
