#!/usr/bin/env bash
# Regenerates reports/fedcompass.md's data, figures and tables. Run from the repository root.
set -e
FEDSIM=${FEDSIM:-.venv/bin/fedsim}
PY=${PY:-.venv/bin/python}
R=reports/runs/fedcompass
F=reports/figures
mkdir -p "$F"

# 1. the 12 runs (4 methods x 3 seeds), about 18 min on 2 cores
"$FEDSIM" run scenarios/fedcompass.toml --rerun --out $R --no-progress
# side check: FedAsync / FedBuff with APPFL's per-update server weight alpha * s(tau) / N (6 runs)
"$FEDSIM" run scenarios/fedcompass.toml --rerun --out $R/appfl_weights --no-progress \
  --set 'sweep.algorithm=[{ name = "fedasync", local_steps = 50, round_seconds = 10.0, alpha = 0.045 }, { name = "fedbuff", local_steps = 50, buffer_size = 3, round_seconds = 10.0, server_lr = 0.135 }]'
find $R \( -name convergence.png -o -name checkpoint.pt \) -delete   # keep metrics.csv, summary.json, scenario.toml, runs.csv

# 2. figures
"$FEDSIM" plot $R/runs.csv --by algorithm.name --x sim_time --metric test_accuracy -o $F/fedcompass_accuracy_vs_time.png
"$FEDSIM" plot $R/runs.csv --by algorithm.name --x sim_time --metric test_loss -o $F/fedcompass_loss_vs_time.png
"$FEDSIM" plot $R/*fedasync* $R/*fedbuff* $R/*fedcompass* --by algorithm.name --x sim_time --metric mean_staleness -o $F/fedcompass_staleness_vs_time.png
"$FEDSIM" plot $R/runs.csv --by algorithm.name --x bytes_sent --metric test_accuracy -o $F/fedcompass_accuracy_vs_bytes.png
"$FEDSIM" plot $R/appfl_weights/runs.csv $R/*fedavg* $R/*fedcompass* --by algorithm.name --x sim_time --metric test_accuracy -o $F/fedcompass_side_appfl_weights.png

# 3. tables (about 1 min: includes a no-training replay of each FedCompass run's scheduler)
"$PY" reports/fedcompass_tables.py $R
