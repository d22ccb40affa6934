#!/usr/bin/env bash
# Seeded runs whose files must not change under a refactor: prints a sha256 for every file a
# training run (two families), a toy bench run and an analysis write. Compare two checkouts with
#   benchmarks/fingerprint.sh /tmp/before > before.txt   (on the old commit)
#   benchmarks/fingerprint.sh /tmp/after  > after.txt    (on the new one);  diff before.txt after.txt
# Files that record times, versions or paths (metrics.jsonl, config.json, results.json) are left out.
set -euo pipefail
OUT=${1:?usage: fingerprint.sh OUT_DIR}
SAELAB=${SAELAB:-.venv/bin/saelab}
rm -rf "$OUT" && mkdir -p "$OUT"
common=(--tokens 16384 --batch-size 512 --context-size 128 --device cpu --dtype float32 --seed 7 --no-eval)
"$SAELAB" train --run-dir "$OUT/topk" --architecture topk --width 512 --k 16 "${common[@]}" >/dev/null 2>&1
"$SAELAB" train --run-dir "$OUT/relu" --architecture relu --width 512 --l1 1.0 "${common[@]}" >/dev/null 2>&1
"$SAELAB" analyze "$OUT/topk" --tokens 8192 --device cpu --dtype float32 --seed 7 >/dev/null 2>&1
"$SAELAB" toy bench --out "$OUT/toy" --setting uniform --quick --seed 7 >/dev/null 2>&1
cd "$OUT"
find . -type f \( -name '*.safetensors' -o -name 'cfg.json' -o -name '*.db' -o -name '*.csv' \) \
    | sort | xargs sha256sum
