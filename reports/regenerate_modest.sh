#!/usr/bin/env bash
# Regenerates reports/modest.md's data, figures and tables. Run from the repository root.
set -e
FEDSIM=${FEDSIM:-.venv/bin/fedsim}
PY=${PY:-.venv/bin/python}
R=reports/runs/modest
F=reports/figures
mkdir -p "$F"

# 1. the 14 runs (7 cases x 2 seeds), full scenario, no reduction; about 25 min on 2 shared cores
"$FEDSIM" run scenarios/modest.toml --rerun --out $R --no-progress
find $R \( -name convergence.png -o -name checkpoint.pt \) -delete   # keep metrics.csv, summary.json, scenario.toml, runs.csv

# 2. figures
"$FEDSIM" plot $R/runs.csv --by cases --x bytes_sent --metric test_accuracy \
  --title "Fashion-MNIST, 100 nodes: accuracy vs bytes sent (mean of 2 seeds, min-max band)" -o $F/modest_accuracy_vs_bytes.png
# zoom of the headline without gossip (gossip's ~50 GB squeezes the others against the y axis)
"$FEDSIM" plot $R/*case=modest $R/*case=fedavg $R/*case=dpsgd --by cases --x bytes_sent --metric test_accuracy \
  --title "Accuracy vs bytes sent, without gossip (mean of 2 seeds)" -o $F/modest_accuracy_vs_bytes_zoom.png
# without modest-crash80 (its 2,300 simulated seconds squeeze the others; it has its own figure below)
"$FEDSIM" plot $R/*case=modest $R/*case=fedavg $R/*case=dpsgd $R/*case=gossip --by cases --x sim_time --metric test_accuracy \
  --title "Fashion-MNIST, 100 nodes: accuracy vs simulated time" -o $F/modest_accuracy_vs_time.png
"$FEDSIM" plot $R/*case=modest $R/*case=modest-crash80 --by cases --x round --metric test_accuracy \
  --title "MoDeST, 80% of nodes crash at protocol round 30" -o $F/modest_crash_accuracy_vs_round.png
"$FEDSIM" plot $R/*case=modest $R/*case=modest-crash80 --by cases --x sim_time --metric test_accuracy \
  --title "MoDeST, 80% crash at round 30: accuracy vs simulated time" -o $F/modest_crash_accuracy_vs_time.png

# 3. tables
"$PY" reports/modest_tables.py
