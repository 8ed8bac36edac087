#!/usr/bin/env bash
# Rebuilds reports/baselines.md's data and tables. Run from the repository root:
#   bash reports/regenerate_baselines.sh
# 144 runs (16 methods x 3 splits x 3 seeds), about an hour on 2 cores.
# The report embeds the tables printed at the end; paste them in if the numbers move.
set -e
FEDSIM=${FEDSIM:-.venv/bin/fedsim}
PY=${PY:-.venv/bin/python}
R=reports/runs/baselines
rm -rf "$R"
mkdir -p "$R"
git rev-parse --short HEAD > "$R/commit.txt"   # the fedsim commit the runs ran on (the report names it)
"$FEDSIM" run scenarios/baselines.toml --rerun --out "$R" --no-progress
find "$R" \( -name convergence.png -o -name checkpoint.pt -o -name .runs.csv.lock \) -delete
"$PY" reports/baselines_tables.py
