#!/usr/bin/env bash
# Rebuilds reports/privacy.md's data, table and figure. Run from the repository root:
#   bash reports/regenerate_privacy.sh
# 12 runs (Fashion-MNIST, 20 clients, 30 rounds, 1 seed), about 5 minutes on a shared 2-core machine.
set -e
FEDSIM=${FEDSIM:-.venv/bin/fedsim}
PY=${PY:-.venv/bin/python}
R=reports/runs/privacy
rm -rf "$R"
mkdir -p "$R"
git rev-parse --short HEAD > "$R/commit.txt"   # the fedsim commit the runs ran on (the report names it)
"$FEDSIM" run scenarios/privacy.toml --out "$R" --no-progress
find "$R" \( -name convergence.png -o -name checkpoint.pt \) -delete
"$PY" reports/privacy_tables.py
