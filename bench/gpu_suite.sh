#!/usr/bin/env bash
# The GPU figures of the README: seconds per edit and peak GPU memory on a Qwen2-0.5B-shaped random model
# (bf16) and on the default world (bf16 and float32), KDPO against FT-M in the same run.
#   bash bench/gpu_suite.sh WORLD_DIR OUT_DIR       (WORLD_DIR: a built default world, e.g. $KDPO_HOME/worlds/<key>)
set -uo pipefail
world=${1:?a built world directory}; out=${2:?a folder for the reports}
python=${PYTHON:-python3}
mkdir -p "$out"; results=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
keep() {  # copy a finished report next to the others, named by its run
  cp "$results/$1/report.md" "$out/$1.md" && cp "$results/$1/report.json" "$out/$1.json"
}
$python -m bench.scale --world "$world" --shape qwen2-0.5b --device cuda --dtype bfloat16 --edits 10,25 \
  --methods kdpo,ft-m --models "$results/models" --name qwen05-bf16 --out "$results/qwen05-bf16" --quiet >/dev/null && keep qwen05-bf16
for dtype in bfloat16 float32; do
  $python -m bench.compare --world "$world" --device cuda --dtype $dtype --edits 25,100 --methods kdpo,ft-m \
    --no-mlflow --name default-$dtype --out "$results/default-$dtype" --quiet >/dev/null && keep default-$dtype
done
ls -la "$out"
