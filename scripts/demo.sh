#!/usr/bin/env bash
# The whole pipeline on CPU in minutes: CPython's own docs -> tokenizer + shards -> tiny model -> int6 export ->
# compressed blob -> submission bundle -> size check -> sliding-window + n-gram eval. Prints val_bpb and bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/demo}
rm -rf "$OUT" && mkdir -p "$OUT"

python3 scripts/cpython_docs_corpus.py > "$OUT/corpus.jsonl"
pgolf tokenize "$OUT/corpus.jsonl" --vocab-size 1024 --val-docs 24 --out "$OUT/data"
pgolf data check "$OUT/data"
pgolf train "$OUT/data" --preset tiny --iterations 150 --out "$OUT/train"
pgolf quantize "$OUT/train" --plan int6 --out "$OUT/q"
pgolf compress "$OUT/q" --codec auto --out "$OUT/blob"
pgolf eval "$OUT/blob" --data "$OUT/data" --sliding-stride 32 --out "$OUT/eval"
pgolf eval "$OUT/blob" --data "$OUT/data" --sliding-stride 32 --ngram-order 2,3,4 --alpha 0.1,0.3 --out "$OUT/eval-ngram"
pgolf bundle --train "$OUT/train" --blob "$OUT/blob" --eval "$OUT/eval" --name "pgolf demo" --github-id demo \
  --compress-code --out "$OUT/submission"
pgolf verify-size "$OUT/blob" --bundle "$OUT/submission" --json > "$OUT/size.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
metrics = json.load(open(f"{out}/eval/manifest.json"))["metrics"]
size = json.load(open(f"{out}/size.json"))
print(f"demo: val_bpb {metrics['val_bpb']:.4f} (sliding window), val_loss {metrics['val_loss']:.4f}; "
      f"artifact {size['total_bytes']:,} bytes (blob {size['blob_bytes']:,} + code {size['code_bytes']:,})")
PY
