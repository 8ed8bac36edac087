#!/usr/bin/env bash
# Rebuilds reports/robustness.md's data, tables and figures. Run from the repository root:
#   bash reports/regenerate_robustness.sh
# 221 runs (server: 6 rules x (4 attacks x 3 fractions + clean); graphs: 5 rules x 2 graphs and
# Krum on the regular graph, same grid), one seed, the server and graph sweeps side by side
# (one process each): about 30 minutes on a shared 2-core machine.
# The report embeds the tables printed at the end; paste them in if the numbers move.
set -e
FEDSIM=${FEDSIM:-.venv/bin/fedsim}
PY=${PY:-.venv/bin/python}
R=reports/runs/robustness
rm -rf "$R"
mkdir -p "$R"
git rev-parse --short HEAD > "$R/commit.txt"   # the fedsim commit the runs ran on (the report names it)
CLEAN=(--set 'sweep."adversary.fraction"=[0.0]' --set 'sweep."adversary.behaviour"=["sign_flip"]')
RR=(--set 'sweep.topology=[{ name = "random_regular", degree = 4 }]'
    --set 'sweep.cases=[{ label = "krum", aggregator = { name = "krum", f = 1 } }]')
(
  "$FEDSIM" run scenarios/robustness.toml --out "$R/server" --no-progress "${CLEAN[@]}"
  "$FEDSIM" run scenarios/robustness.toml --out "$R/server" --no-progress
) > "$R/server.log" 2>&1 &
server=$!
(
  "$FEDSIM" run scenarios/robustness_graph.toml --out "$R/graph" --no-progress "${CLEAN[@]}"
  "$FEDSIM" run scenarios/robustness_graph.toml --out "$R/graph" --no-progress "${RR[@]}" "${CLEAN[@]}"
  "$FEDSIM" run scenarios/robustness_graph.toml --out "$R/graph" --no-progress "${RR[@]}"
  "$FEDSIM" run scenarios/robustness_graph.toml --out "$R/graph" --no-progress
) > "$R/graph.log" 2>&1 &
graph=$!
wait $server
wait $graph
find "$R" \( -name convergence.png -o -name checkpoint.pt \) -delete
"$PY" reports/robustness_tables.py
