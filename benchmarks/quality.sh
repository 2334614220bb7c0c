#!/usr/bin/env bash
# Train and evaluate the gate on every benchmark setting of issue 3; tables and plots land in reports/<run>/.
# Usage: bash benchmarks/quality.sh [extra Hydra overrides for training...]
#        RUNS="clinc150 banking77" bash benchmarks/quality.sh     # only some of the settings
# Needs ../shared/datasets (datasets_dir) and the MiniLM package; embeddings are cached after the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1

RUNS=${RUNS:-clinc150 stackoverflow20 banking77 clinc150_intents stackoverflow20_kmeans16 stackoverflow20_kmeans64 synthetic_kmeans16 synthetic_kmeans64 stackoverflow20_balanced64 synthetic_balanced64 clinc150_ensemble stackoverflow20_ensemble banking77_ensemble clinc150_intents_ensemble stackoverflow20_kmeans16_ensemble}

run() {  # run NAME TRAIN_OVERRIDES... -- EVAL_OVERRIDES...
  local name=$1; shift
  [[ " $RUNS " == *" $name "* ]] || return 0
  local train=() evalo=()
  while [[ $# -gt 0 && $1 != "--" ]]; do train+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  evalo=("$@")
  echo "=== $name"
  "$PY" scripts/train.py "${train[@]}" out="checkpoints/$name" "${EXTRA[@]}"
  "$PY" scripts/evaluate.py ckpt="checkpoints/$name" out_dir="reports/$name" "${evalo[@]}"
}
EXTRA=("$@")

run clinc150 data=clinc150 -- data=clinc150
run stackoverflow20 data=stackoverflow20 -- data=stackoverflow20
run banking77 data=banking77 -- data=banking77
# Layouts other than the data's own experts train with train.yaml's values ('~cv_chosen') unless a
# configs/cv_chosen file was cross-validated for them: the data's own file was made for one expert per domain (or label).
# 150 intents, 16 and 64 k-means shards and the size-capped 64 have cross-validated files of their own (configs/cv_chosen/<row>.yaml).
run clinc150_intents data=clinc150 data.expert_key=label data.parent_key=domain cv_chosen=clinc150_intents \
  -- data=clinc150 data.expert_key=label data.parent_key=domain
run stackoverflow20_kmeans16 data=stackoverflow20 partition=16 cv_chosen=stackoverflow20_kmeans16 -- data=stackoverflow20
run stackoverflow20_kmeans64 data=stackoverflow20 partition=64 cv_chosen=stackoverflow20_kmeans64 -- data=stackoverflow20
# Learned sharding on vectors without labels (configs/data/synthetic.yaml); 30k sampled pseudo-queries keep training short.
run synthetic_kmeans16 data=synthetic partition=16 targets.max_queries=30000 -- data=synthetic
run synthetic_kmeans64 data=synthetic partition=64 targets.max_queries=30000 -- data=synthetic
# The same 64 shards with a size cap (k-means, no shard above 1.5x the mean size).
run stackoverflow20_balanced64 data=stackoverflow20 partition=64 partition_max_imbalance=1.5 cv_chosen=stackoverflow20_balanced64 \
  -- data=stackoverflow20
run synthetic_balanced64 data=synthetic partition=64 partition_max_imbalance=1.5 targets.max_queries=30000 -- data=synthetic
# The ensemble gate (model=ensemble: 3 hybrid gates assembled into one) on the label settings and one learned sharding.
run clinc150_ensemble data=clinc150 model=ensemble -- data=clinc150
run stackoverflow20_ensemble data=stackoverflow20 model=ensemble -- data=stackoverflow20
run banking77_ensemble data=banking77 model=ensemble -- data=banking77
run clinc150_intents_ensemble data=clinc150 data.expert_key=label data.parent_key=domain model=ensemble '~cv_chosen' \
  -- data=clinc150 data.expert_key=label data.parent_key=domain
run stackoverflow20_kmeans16_ensemble data=stackoverflow20 partition=16 model=ensemble '~cv_chosen' -- data=stackoverflow20
