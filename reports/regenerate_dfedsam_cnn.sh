#!/usr/bin/env bash
# Rebuilds the CNN part of reports/dfedsam.md: runs, figures and tables.
# Run from the repository root: bash reports/regenerate_dfedsam_cnn.sh
# 18 runs of 120 rounds, split into two processes that run at once (one core each: the CNN trains
# one client after another on one thread). DFedSAM-MGS is left out on the complete graph, where
# W^4 = W (exact averaging) makes it DFedSAM. About 60 minutes on 2 idle cores.
set -euo pipefail
FEDSIM=${FEDSIM:-.venv/bin/fedsim}
PY=${PY:-.venv/bin/python}
F=reports/figures
R=reports/runs/dfedsam_cnn
mkdir -p "$F"
rm -rf "$R"
run() { "$FEDSIM" run scenarios/dfedsam_cnn.toml --rerun --out "$R" --no-progress "$@"; }
ring() {  # one seed on the ring: DFedAvg, DFedSAM, DFedSAM-MGS, then D-PSGD (1 local step)
  run --set "sweep.seed=[$1]" --set 'sweep."topology.name"=["ring"]'
  run --set "sweep.seed=[$1]" --set 'sweep."topology.name"=["ring"]' --set 'sweep."algorithm.name"=["dpsgd"]' --set algorithm.local_steps=1
}
complete() {  # both seeds on the complete graph, algorithms $@
  for a in "$@"; do
    local steps=()
    [ "$a" = dpsgd ] && steps=(--set algorithm.local_steps=1)
    run --set 'sweep."topology.name"=["complete"]' --set "sweep.\"algorithm.name\"=[\"$a\"]" "${steps[@]}"
  done
}
{ ring 0; complete dfedsam; } & a=$!
{ ring 1; complete dfedavg dpsgd; } & b=$!
wait $a
wait $b
for t in ring complete; do
  "$FEDSIM" plot $R/dfedsam_cnn-algorithm=*-topology=$t-seed=* --by algorithm.name -o $F/dfedsam_cnn_acc_$t.png
done
"$FEDSIM" plot $R/dfedsam_cnn-algorithm=*-topology=ring-seed=* --by algorithm.name --metric avg_model_accuracy -o $F/dfedsam_cnn_avg_acc_ring.png
"$FEDSIM" plot $R/dfedsam_cnn-algorithm=*-topology=ring-seed=* --by algorithm.name --metric consensus_distance -o $F/dfedsam_cnn_consensus_ring.png
"$PY" reports/tables.py dfedsam_cnn
find "$R" \( -name convergence.png -o -name checkpoint.pt -o -name '.*.lock' \) -delete
