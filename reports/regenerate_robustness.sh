#!/usr/bin/env bash
# Rebuilds reports/robustness.md's data, tables and figures. Run from the repository root:
#   bash reports/regenerate_robustness.sh          # both halves, side by side (one process each)
#   bash reports/regenerate_robustness.sh server   # or one half: server | graph
#   bash reports/regenerate_robustness.sh alie     # ALIE with 50 clients per merge (36 runs, ~10 min)
# 208 runs, one seed (and the ALIE check's 36, two seeds): server, 6 rules x (4 attacks x 3 fractions + clean) = 78; graphs, 4 rules on
# the ring and 6 on the random 4-regular graph, same grid = 130. About 75 minutes of wall time on a
# 2-core machine at load average 5-8 on the branch engine; 7 min 13 s on the final one (36a5f69).
# The report embeds the tables printed at the end; paste them in if numbers move.
set -e
FEDSIM=${FEDSIM:-.venv/bin/fedsim}
PY=${PY:-.venv/bin/python}
R=reports/runs/robustness
PART=${1:-all}
mkdir -p "$R"
CLEAN=(--set 'sweep."adversary.fraction"=[0.0]' --set 'sweep."adversary.behaviour"=["sign_flip"]')
RR=(--set 'topology={ name = "random_regular", degree = 4 }'
    --set 'sweep.cases=[{ label = "mean", system = { executor = "inline" } },
      { label = "median", aggregator = { name = "median" } },
      { label = "trimmed_mean", aggregator = { name = "trimmed_mean", f = 1 } },
      { label = "krum", aggregator = { name = "krum", f = 1 } },
      { label = "geometric_median", aggregator = { name = "geometric_median" } },
      { label = "centered_clipping", aggregator = { name = "centered_clipping", tau = 0.5, iterations = 3 } }]')
server() {
  rm -rf "$R/server" && mkdir -p "$R/server"
  git rev-parse --short HEAD > "$R/server/commit.txt"   # the fedsim commit the runs ran on
  "$FEDSIM" run scenarios/robustness.toml --out "$R/server" --no-progress "${CLEAN[@]}"
  "$FEDSIM" run scenarios/robustness.toml --out "$R/server" --no-progress
}
graph() {
  rm -rf "$R/graph" && mkdir -p "$R/graph"
  git rev-parse --short HEAD > "$R/graph/commit.txt"
  "$FEDSIM" run scenarios/robustness_graph.toml --out "$R/graph/ring" --no-progress "${CLEAN[@]}"
  "$FEDSIM" run scenarios/robustness_graph.toml --out "$R/graph/ring" --no-progress
  "$FEDSIM" run scenarios/robustness_graph.toml --out "$R/graph/random_regular" --no-progress "${RR[@]}" "${CLEAN[@]}"
  "$FEDSIM" run scenarios/robustness_graph.toml --out "$R/graph/random_regular" --no-progress "${RR[@]}"
}
alie() {
  rm -rf "$R/alie" && mkdir -p "$R/alie"
  git rev-parse --short HEAD > "$R/alie/commit.txt"
  "$FEDSIM" run scenarios/robustness_alie.toml --out "$R/alie" --no-progress --set 'sweep."adversary.fraction"=[0.0]'
  "$FEDSIM" run scenarios/robustness_alie.toml --out "$R/alie" --no-progress
}
case "$PART" in
  server) server > "$R/server.log" 2>&1 ;;
  graph) graph > "$R/graph.log" 2>&1 ;;
  alie) alie > "$R/alie.log" 2>&1 ;;
  all) { server > "$R/server.log" 2>&1; alie > "$R/alie.log" 2>&1; } & s=$!; graph > "$R/graph.log" 2>&1 & g=$!
    wait $s; wait $g ;;
  *) echo "usage: $0 [server|graph|alie|all]" >&2; exit 2 ;;
esac
find "$R" \( -name convergence.png -o -name checkpoint.pt -o -name .runs.csv.lock \) -delete
"$PY" reports/robustness_tables.py
