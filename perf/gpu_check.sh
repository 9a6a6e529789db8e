#!/usr/bin/env bash
# The one script to run on a CUDA machine (no network needed), from the repository root:
#   1. the kernel tests on the GPU (tests/, small shapes, every dtype and layout),
#   2. perf.gpu_check: every kernel at AlexNet's real shapes (batch 128) against float64 torch,
#      then timed against torch (cuDNN, cudnn.benchmark=True), JSON + table,
#   3. perf.report: the compute breakdown of the single and paper nets (batch 128), per-layer
#      times of both backends next to each layer's FLOP share, JSON + Markdown.
# Results go to $OUT if set (the device tool brings it back), else perf/results/local/.
# Commit the JSON under perf/results/ named with the card and date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-perf/results/local}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

# Use this checkout: an editable install maps kernels/ to fastalex.kernels.
"$PY" -m pip install --no-deps --no-build-isolation -q -e . >"$OUT/install.log" 2>&1 || {
    echo "editable install failed; see $OUT/install.log"; exit 2; }
"$PY" - <<'PY' | tee "$OUT/versions.txt"
import torch, triton
print("card", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
PY

status=0
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest tests -q -x -n 8 -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1 || status=1
tail -n 15 "$OUT/tests.log"

timeout "${CHECK_TIMEOUT:-300}" "$PY" -m perf.gpu_check --out "$OUT" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check.log" | tail -n 80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for variant in single paper; do
    timeout "${REPORT_TIMEOUT:-300}" "$PY" -m perf.report --device cuda --backend both --batch-size 128 \
        --variant "$variant" --json "$OUT/report_$variant.json" --markdown "$OUT/report_$variant.md" 2>&1 \
        | tee "$OUT/report_$variant.log" | tail -n 40
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
