#!/usr/bin/env bash
# Regenerates every report's runs, figures and tables on this checkout (`make reports` calls it).
# Run from the repository root. Each report's own script says what it runs; this one runs them in
# turn, records the commit they ran on and the wall time of each in reports/runs/timings.txt.
# The markdown reports embed the tables the scripts print: paste them in where the numbers moved.
# Expect about 5 hours of wall time on 2 cores: the scripts' measured times add up to 4.9 hours
# (2026-11-30, several of them on a machine shared with other report jobs; see each report's header).
# Run one script alone to refresh a single report.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p reports/runs
log=reports/runs/timings.txt
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)'), $(date -u +%F)" > "$log"
for script in regenerate.sh regenerate_dfedsam_cnn.sh regenerate_fedcompass.sh regenerate_modest.sh regenerate_finetune.sh \
    regenerate_baselines.sh regenerate_robustness.sh regenerate_privacy.sh regenerate_compression.sh; do
  start=$(date +%s)
  bash "reports/$script"
  echo "$script: $(( $(date +%s) - start )) s" | tee -a "$log"
done
