#!/usr/bin/env bash
# Two students side by side, three seeds each: the paper's losses only (experiment=cpu_paper_losses)
# and the full CPU recipe (experiment=cpu), each scored on the DAVIS-2016 sample as trained (no edge
# refinement, reads weighted 1/1) and with the recipe's inference options; then docs/RESULTS.md.
#   bash experiments/students/compare.sh [SEEDS="0 1 2"] [RUNS=runs/students]
# About 20 minutes per training on a 2-core CPU; run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-"0 1 2"}
RUNS=${RUNS:-runs/students}
DVOS=${DVOS:-.venv/bin/dvos}
make install
runs=()
for experiment in cpu_paper_losses cpu; do
  for seed in $SEEDS; do
    run="$RUNS/$experiment-seed$seed"
    if [ ! -f "$run/summary.json" ]; then
      resume=()
      [ -f "$run/checkpoints/last.ckpt" ] && resume=(ckpt_path=last)  # an interrupted run goes on
      "$DVOS" train "experiment=$experiment" "seed=$seed" "run_dir=$run" logger.mode=offline "${resume[@]}"
    fi
    # as trained: no edge refinement, the two reads weighted 1/1 (the input scale stays the recipe's)
    if [ ! -f "$run/as-trained/results.json" ]; then
      "$DVOS" evaluate --ckpt "$run/checkpoints/last.ckpt" "experiment=$experiment" \
        eval.refine_iterations=0 eval.long_term_weight=null --out "$run/as-trained"
    fi
    runs+=("$run")
  done
done
"$DVOS" report "${runs[@]}" --out "$RUNS/RESULTS.md"
echo "per-run tables (recipe inference options): $RUNS/RESULTS.md"
echo "as-trained scores: $RUNS/*/as-trained/global_results-val.csv"
