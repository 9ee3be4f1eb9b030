#!/usr/bin/env bash
# Evaluate bicubic and every shipped x4 model on the bundled test photos (no download), then
# render the Markdown/HTML report with its figures.
#   bash scripts/make_report.sh                 # -> reports/bundled_x4/report.{md,html}
#   bash scripts/make_report.sh OUT_DIR         # another folder
# Eval JSON and SR images go to OUT_DIR/eval/ (the report reuses the SR images and re-runs only
# Granular-DQ, for its bit maps). About a minute on 2 CPU cores. Needs matplotlib
# (pip install "lowbitsr[report]").
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-reports/bundled_x4}"

# shipped x4 models, float first
mapfile -t models < <(python - <<'PY'
from lowbitsr.pretrained import list_pretrained, pretrained_info

names = [n for n in list_pretrained() if pretrained_info(n)["model"]["scale"] == 4]
print("\n".join(sorted(names, key=lambda n: (not n.endswith("_fp"), n))))
PY
)
echo "== models: bicubic ${models[*]}"

rm -rf "$out/eval" "$out/report.md" "$out/report.html"
rm -f "$out"/*.png
lowbitsr eval bicubic "${models[@]}" --dataset bundled:test \
  --json-dir "$out/eval/json" --save-images "$out/eval/sr" --quiet
lowbitsr report "$out/eval/json" --output "$out" --title "Shipped x4 models on the bundled test photos"
echo "== open $out/report.html (self-contained) or $out/report.md"
