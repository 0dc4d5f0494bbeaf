#!/usr/bin/env bash
# The GPU figures of the README: seconds per edit and peak GPU memory, KDPO against FT-M in the same run, on
# random models of Qwen2-0.5B and Qwen2-1.5B shape (bf16) and on the default world (bf16 and float32).
#   bash bench/gpu_suite.sh WORLD_DIR OUT_DIR [PART...]    PART: qwen05 qwen15 default (default: all three)
# WORLD_DIR is a built default world, e.g. $KDPO_HOME/worlds/<key>; each run's report lands in OUT_DIR.
set -uo pipefail
world=${1:?a built world directory}; out=${2:?a folder for the reports}; shift 2
parts=${*:-qwen05 qwen15 default}
python=${PYTHON:-python3}
mkdir -p "$out"; results=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
keep() {  # copy a finished report next to the others, named by its run
  cp "$results/$1/report.md" "$out/$1.md" && cp "$results/$1/report.json" "$out/$1.json"
}
scale() {  # NAME SHAPE EDITS
  $python -m bench.scale --world "$world" --shape "$2" --device cuda --dtype bfloat16 --edits "$3" \
    --methods kdpo,ft-m --models "$results/models" --name "$1" --out "$results/$1" --quiet >/dev/null && keep "$1"
}
for part in $parts; do
  case $part in
    qwen05) scale qwen05-bf16 qwen2-0.5b 10,50 ;;
    qwen15) scale qwen15-bf16 qwen2-1.5b 10,25 ;;
    default)
      for dtype in bfloat16 float32; do
        $python -m bench.compare --world "$world" --device cuda --dtype $dtype --edits 25,100 --methods kdpo,ft-m \
          --no-mlflow --name default-$dtype --out "$results/default-$dtype" --quiet >/dev/null && keep default-$dtype
      done ;;
    *) echo "unknown part $part (qwen05, qwen15, default)" >&2; exit 2 ;;
  esac
done
ls -la "$out"
