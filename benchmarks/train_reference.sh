#!/usr/bin/env bash
# Reproduce the foundation acceptance figures in benchmarks/results/foundation.md:
#   1. concat fusion (MiniLM-L6 + EfficientNet-Lite0, frozen towers) trained on flickr8k-1k train,
#      scored on dev with 1:1 true / mismatched captions (ROC-AUC, accuracy at the stored threshold);
#   2. dual encoder on the same towers, recall@1/5/10 over the 113 dev images;
#   3. EfficientNet-Lite0's own ImageNet classifier, top-1 on imagenet-sample.
# Checkpoints go to runs/flickr-concat and runs/flickr-dual, JSON to benchmarks/results/foundation/.
#
# Usage: benchmarks/train_reference.sh            (from the repository root or anywhere)
# Environment: EDGEMM_SHARED_DATA (default ../shared/data), EDGEMM (default .venv/bin/edgemm),
#              FEATURE_CACHE (default runs/feature-cache; delete it to time a cold run).
set -euo pipefail

cd "$(dirname "$0")/.."
DATA="${EDGEMM_SHARED_DATA:-../shared/data}"
EDGEMM="${EDGEMM:-.venv/bin/edgemm}"
FEATURE_CACHE="${FEATURE_CACHE:-runs/feature-cache}"
OUT=benchmarks/results/foundation
FLICKR="$DATA/flickr8k-1k"
IMAGENET="$DATA/imagenet-sample"

# One thread per process: on a shared 2-core machine two threads mostly wait on each other.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

mkdir -p "$OUT" runs
.venv/bin/python - "$OUT/machine.json" <<'PY'
import json, os, platform, sys, time

import torch

cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
machine = {
    "cpu_model": cpu,
    "logical_cores": os.cpu_count(),
    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    "load_average_at_start": os.getloadavg(),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}
with open(sys.argv[1], "w") as handle:
    json.dump(machine, handle, indent=2)
print(json.dumps(machine))
PY

DURATIONS="$(mktemp)"
timed() {
    # Run a command and record its wall-clock seconds under the step name.
    local name="$1"
    shift
    local start=$SECONDS
    "$@"
    echo "$name $((SECONDS - start))" >> "$DURATIONS"
}

timed train-concat "$EDGEMM" train "$FLICKR" --arch concat_fusion --text-tower minilm-l6 --image-tower efficientnet-lite0 \
    --epochs 20 --batch-size 64 --lr 1e-3 --seed 0 --cache-dir "$FEATURE_CACHE" \
    --out runs/flickr-concat --overwrite --json "$OUT/train-concat.json"
timed eval-concat "$EDGEMM" eval runs/flickr-concat "$FLICKR" --split dev --cache-dir "$FEATURE_CACHE" --json "$OUT/eval-concat.json"

timed train-dual "$EDGEMM" train "$FLICKR" --arch dual_encoder --text-tower minilm-l6 --image-tower efficientnet-lite0 \
    --epochs 20 --batch-size 64 --lr 1e-3 --seed 0 --cache-dir "$FEATURE_CACHE" \
    --out runs/flickr-dual --overwrite --json "$OUT/train-dual.json"
timed eval-dual "$EDGEMM" eval runs/flickr-dual "$FLICKR" --split dev --cache-dir "$FEATURE_CACHE" --json "$OUT/eval-dual.json"

timed imagenet "$EDGEMM" eval-imagenet "$IMAGENET" --image-tower efficientnet-lite0 --json "$OUT/imagenet.json"

.venv/bin/python - "$DURATIONS" "$OUT/durations.json" <<'PY'
import json, sys

steps = dict(line.split() for line in open(sys.argv[1]) if line.strip())
seconds = {name: int(value) for name, value in steps.items()}
with open(sys.argv[2], "w") as handle:
    json.dump({"wall_clock_seconds": seconds}, handle, indent=2)
print(json.dumps(seconds))
PY
rm -f "$DURATIONS"
