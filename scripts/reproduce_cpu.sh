#!/usr/bin/env bash
# Train every shipped model and every row of the RESULTS.md CPU tables, in order, on the bundled
# photos; then ship the demo weights and print the tables. Re-running skips finished runs and
# resumes interrupted ones (each run checkpoints every 100-250 iterations).
#   bash scripts/reproduce_cpu.sh            # all of it (about 2 h on 2 CPU cores)
#   bash scripts/reproduce_cpu.sh ddtb       # only the runs whose config name contains "ddtb"
#   bash scripts/reproduce_cpu.sh '!gdq'     # all runs except those containing "gdq"
set -euo pipefail
cd "$(dirname "$0")/.."
filter="${1:-}"

run() {  # run <train|quantize> <config name>
  local cmd=$1 name=$2
  if [[ "$filter" == "!"* ]]; then [[ "$name" == *"${filter:1}"* ]] && return 0
  elif [[ -n "$filter" && "$name" != *"$filter"* ]]; then return 0; fi
  if [[ -f "runs/$name/model.json" ]]; then echo "== $name: done"; return 0; fi
  echo "== $name"
  lowbitsr "$cmd" "configs/$name.yaml" --resume --quiet
}

run train edsr_tiny_x4_fp
[[ -f src/lowbitsr/pretrained/edsr_tiny_x4_fp.json ]] || python scripts/ship_pretrained.py runs/edsr_tiny_x4_fp
# DDTB/PAMS table: 2 and 4 bits and the no-gate ablation first, 3 bits last
for bits in 2 4; do
  run quantize "edsr_tiny_x4_pams_w${bits}a${bits}"
  run quantize "edsr_tiny_x4_ddtb_w${bits}a${bits}"
done
run quantize edsr_tiny_x4_ddtb_nogate_w2a2
run quantize edsr_tiny_x4_pams_w3a3
run quantize edsr_tiny_x4_ddtb_w3a3
# Granular-DQ table: fixed-bit baselines, the learned gate, then the matched random gate
for bits in 4 8; do run quantize "edsr_tiny_x4_gdq_w8a${bits}"; done
run quantize edsr_tiny_x4_gdq
if [[ -z "$filter" || ( "$filter" != "!"* && "edsr_tiny_x4_gdq_random" == *"$filter"* ) ]] \
    && [[ ! -f runs/edsr_tiny_x4_gdq_random/model.json ]]; then
  probs=$(python scripts/match_random_gate.py runs/edsr_tiny_x4_gdq | python -c "import json,sys; print(json.load(sys.stdin)['random_probs'])")
  echo "== edsr_tiny_x4_gdq_random (random_probs=$probs)"
  lowbitsr quantize configs/edsr_tiny_x4_gdq_random.yaml --resume --quiet --set "quant.random_probs=$probs"
fi
run quantize edsr_tiny_x4_gdq_w8a6
run train edsr_tiny_x2_fp
for name in edsr_tiny_x4_pams_w2a2 edsr_tiny_x4_ddtb_w2a2 edsr_tiny_x4_ddtb_w4a4 edsr_tiny_x4_gdq edsr_tiny_x2_fp; do
  if [[ -f "runs/$name/model.json" ]]; then python scripts/ship_pretrained.py "runs/$name"; fi
done
python bench/quality_table.py --runs runs --scale 4 --dataset bundled:test
