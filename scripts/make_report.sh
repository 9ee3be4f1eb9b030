#!/usr/bin/env bash
# Evaluate bicubic and every shipped x4 model on the bundled test photos (no download), then
# render the Markdown/HTML report with its figures.
#   bash scripts/make_report.sh           # -> <repo>/reports/bundled_x4/report.{md,html}
#   bash scripts/make_report.sh OUT_DIR   # another folder (a relative one: from where you are)
# Eval JSON and SR images go to OUT_DIR/eval/ (the report reuses the SR images and re-runs only
# Granular-DQ, for its bit maps). Nothing in OUT_DIR is deleted: the files this script writes are
# overwritten by name, other files are left alone, and the report is built from the eval JSON
# files of this run only. About a minute on 2 CPU cores. Needs matplotlib
# (pip install "lowbitsr[report]").
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/reports/bundled_x4}"
[[ "$out" == /* ]] || out="$PWD/$out"  # relative to the caller's directory
cd "$repo"

# shipped x4 models, float first
mapfile -t models < <(python - <<'PY'
from lowbitsr.pretrained import list_pretrained, pretrained_info

names = [n for n in list_pretrained() if pretrained_info(n)["model"]["scale"] == 4]
print("\n".join(sorted(names, key=lambda n: (not n.endswith("_fp"), n))))
PY
)
echo "== models: bicubic ${models[*]}"

stamp="$(mktemp)"  # eval JSON files newer than this are the ones this run wrote
trap 'rm -f "$stamp"' EXIT
lowbitsr eval bicubic "${models[@]}" --dataset bundled:test \
  --json-dir "$out/eval/json" --save-images "$out/eval/sr" --quiet
mapfile -t results < <(find "$out/eval/json" -maxdepth 1 -name '*.json' -newer "$stamp" | sort)
if [[ ${#results[@]} -eq 0 ]]; then
  echo "make_report.sh: lowbitsr eval wrote no JSON results to $out/eval/json" >&2
  exit 1
fi
lowbitsr report "${results[@]}" --output "$out" \
  --title "Shipped x4 models on the bundled test photos"
echo "== open $out/report.html (self-contained) or $out/report.md"
