#!/usr/bin/env bash
# Retrieval benchmarks on dev, default config: train + evaluate on all of dev (training validates and
# calibrates on dev too: in-sample), then 2-fold cross-validation on dev (train on one half of dev,
# evaluate on the other, both ways: honest). Test judgments are never read.
# Usage: bash benchmarks/retrieval_dev.sh [classic] [stackexchange] [-- extra Hydra overrides for training]
# Reports: reports/retrieval/<data>/ (all of dev) and reports/retrieval/<data>_fold{0,1}/; then
#          python benchmarks/retrieval_summary.py reports/retrieval   prints the side-by-side table.
#        EVAL_ONLY=1 bash benchmarks/retrieval_dev.sh   re-evaluates the checkpoints/ of an earlier run (no training)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
DATA=()
while [[ $# -gt 0 && $1 != "--" ]]; do DATA+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
EXTRA=("$@")
[[ ${#DATA[@]} -gt 0 ]] || DATA=(classic stackexchange)
for d in "${DATA[@]}"; do
  echo "=== $d: all of dev"
  [[ -n ${EVAL_ONLY:-} ]] || "$PY" scripts/train.py data="$d" out="checkpoints/$d" trainer.enable_progress_bar=false \
    ${EXTRA[@]+"${EXTRA[@]}"}
  "$PY" scripts/evaluate.py ckpt="checkpoints/$d" data="$d" split=dev report="reports/retrieval/$d/report.json" \
    out_dir="reports/retrieval/$d"
  for f in 0 1; do
    echo "=== $d: fold $f of dev held out"
    fold=(data.holdout_folds=2 data.holdout_fold=$f)
    [[ -n ${EVAL_ONLY:-} ]] || "$PY" scripts/train.py data="$d" "${fold[@]}" out="checkpoints/${d}_fold$f" \
      trainer.enable_progress_bar=false ${EXTRA[@]+"${EXTRA[@]}"}
    "$PY" scripts/evaluate.py ckpt="checkpoints/${d}_fold$f" data="$d" "${fold[@]}" split=heldout \
      report="reports/retrieval/${d}_fold$f/report.json" out_dir="reports/retrieval/${d}_fold$f"
  done
done
