#!/usr/bin/env bash
# Rebuilds reports/dfedsam.md's and reports/gossip_vc.md's data, figures and tables.
# Run from the repository root: bash reports/regenerate.sh
# About 35 minutes on 2 idle cores. On 2 cores shared with four to six other report jobs: the DFedSAM
# half 54 min, the gossip sweeps about 45 min (their 64-node runs need up to 10 GB of memory each).
# The markdown reports embed the tables printed at the end; paste them in if the numbers move.
set -e
FEDSIM=${FEDSIM:-.venv/bin/fedsim}
PY=${PY:-.venv/bin/python}
F=reports/figures
mkdir -p "$F"

# ---------------------------------------------------------------- DFedSAM (reports/dfedsam.md)
R=reports/runs/dfedsam
rm -rf "$R" reports/runs/dfedsam_rho
# 48 runs: {dpsgd, dfedavg, dfedsam, dfedsam_mgs} x {ring, torus, exponential, complete} x seeds 0-2
"$FEDSIM" run scenarios/dfedsam_topologies.toml --rerun --out "$R" --no-progress
# extra check: DFedSAM on the ring with the baselines' lr_decay = 1.0 and rho in {0.01, 0.05, 0.2} (9 runs)
"$FEDSIM" run scenarios/dfedsam_topologies.toml --rerun \
  --set 'sweep."algorithm.name"=["dfedsam"]' --set 'sweep."topology.name"=["ring"]' \
  --set 'sweep."algorithm.rho"=[0.01, 0.05, 0.2]' --set algorithm.lr_decay=1.0 \
  --out reports/runs/dfedsam_rho --no-progress

for t in ring torus exponential complete; do
  "$FEDSIM" plot $R/dfedsam-algorithm=*-topology=$t-seed=* --by algorithm.name -o $F/dfedsam_acc_$t.png
done
"$FEDSIM" plot $R/dfedsam-algorithm=dfedsam-topology=*-seed=* --by topology.name -o $F/dfedsam_by_topology.png
"$FEDSIM" plot $R/dfedsam-algorithm=dfedsam_mgs-topology=*-seed=* --by topology.name -o $F/dfedsam_mgs_by_topology.png
"$FEDSIM" plot $R/dfedsam-algorithm=*-topology=ring-seed=* --by algorithm.name --metric consensus_distance -o $F/dfedsam_consensus_ring.png
"$FEDSIM" plot $R/dfedsam-algorithm=*-topology=ring-seed=* --by algorithm.name --x sim_time -o $F/dfedsam_acc_ring_simtime.png

# ---------------------------------------------------------------- gossip VC (reports/gossip_vc.md)
R=reports/runs/gossip_vc
rm -rf "$R"
# 16 runs: {average, variance_corrected} x {ring, random_regular d=4} x {16, 64 nodes} x seeds 0-1
"$FEDSIM" run scenarios/gossip_vc.toml --rerun --out "$R" --no-progress
# 4 runs: variance correction's paper-era reading (exact rescaling of weights, biases left averaged), 16 nodes
rm -rf reports/runs/gossip_vc_paper
"$FEDSIM" run scenarios/gossip_vc.toml --rerun --out reports/runs/gossip_vc_paper --no-progress --set 'name="gossip_paper"' \
  --set 'sweep."algorithm.merge"=["variance_corrected"]' --set 'algorithm.correction="paper"' \
  --set 'sweep."data.num_clients"=[16]'

for t in ring random_regular; do
  for n in 16 64; do
    "$FEDSIM" plot $R/gossip-merge=*-topology=$t-num_clients=$n-seed=* --by algorithm.merge --x sim_time -o $F/gossip_acc_${t}_$n.png
    "$FEDSIM" plot $R/gossip-merge=*-topology=$t-num_clients=$n-seed=* --by algorithm.merge --x sim_time --metric weight_variance -o $F/gossip_wvar_${t}_$n.png
  done
  "$FEDSIM" plot $R/gossip-merge=variance_corrected-topology=$t-num_clients=16-seed=* \
    reports/runs/gossip_vc_paper/gossip_paper-merge=variance_corrected-topology=$t-num_clients=16-seed=* \
    --by algorithm.correction --x sim_time -o $F/gossip_vc_readings_${t}_16.png
done

# ---------------------------------------------------------------- tables (both reports)
"$PY" reports/tables.py

# keep only metrics.csv, summary.json, scenario.toml and runs.csv under the run folders
# (newer fedsim versions also leave a checkpoint.pt of all node models, ~20 MB, in every finished run)
find reports/runs/dfedsam reports/runs/dfedsam_rho reports/runs/gossip_vc reports/runs/gossip_vc_paper \( -name convergence.png -o -name checkpoint.pt -o -name '.*.lock' \) -delete
