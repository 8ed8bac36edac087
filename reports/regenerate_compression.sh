#!/usr/bin/env bash
# Rebuilds reports/compression.md's data, tables and figures. Run from the repository root:
#   bash reports/regenerate_compression.sh
# 9 FedAvg runs (30 rounds) and 6 CHOCO-SGD runs (300 rounds) on Fashion-MNIST, 20 clients, 1 seed:
# about 15 minutes on a shared 2-core machine.
set -e
FEDSIM=${FEDSIM:-.venv/bin/fedsim}
PY=${PY:-.venv/bin/python}
R=reports/runs/compression
rm -rf "$R"
mkdir -p "$R"
git rev-parse --short HEAD > "$R/commit.txt"   # the fedsim commit the runs ran on (the report names it)
"$FEDSIM" run scenarios/compression.toml --out "$R/server" --no-progress
"$FEDSIM" run scenarios/compression_choco.toml --out "$R/choco" --no-progress
find "$R" \( -name convergence.png -o -name checkpoint.pt \) -delete
"$PY" reports/compression_tables.py
