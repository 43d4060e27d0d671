#!/usr/bin/env bash
# A worked pipeline (README, "A worked pipeline"): train once on the tiny preset, export three quantize plans,
# compress each, score each blob two ways (flat windows and a sliding window), then show every eval side by
# side. Run it again and every stage
# whose output is up to date says so and skips; change a setting and only that stage and the ones after it refuse,
# naming what changed (rerun those with --force).
# OUT: the run folder; STEPS: training steps; PLANS: the quantize plans; DATA: a `pgolf tokenize` output with a
# 1024-piece tokenizer (default: CPython's docs tokenized into $OUT/data, as scripts/demo.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/pipeline}
STEPS=${STEPS:-150}
PLANS=${PLANS:-int8 int6 int6-fp16emb}
DATA=${DATA:-$OUT/data}

if [ "$DATA" = "$OUT/data" ]; then
  mkdir -p "$OUT"
  if [ ! -f "$OUT/corpus.jsonl" ]; then  # written whole or not at all
    python3 scripts/cpython_docs_corpus.py > "$OUT/.corpus.jsonl.tmp"
    mv "$OUT/.corpus.jsonl.tmp" "$OUT/corpus.jsonl"
  fi
  pgolf tokenize "$OUT/corpus.jsonl" --vocab-size 1024 --val-docs 24 --out "$DATA"
fi
pgolf train "$DATA" --preset tiny --iterations "$STEPS" --out "$OUT/train"
for plan in $PLANS; do
  # --keep-float-numel 1024: the tiny model's matrices are under the challenge's 65,536 keep-float size.
  pgolf quantize "$OUT/train" --plan "$plan" --keep-float-numel 1024 --out "$OUT/$plan/q"
  pgolf compress "$OUT/$plan/q" --codec auto --out "$OUT/$plan/blob"
  pgolf eval "$OUT/$plan/blob" --data "$DATA" --out "$OUT/$plan/eval-flat"
  pgolf eval "$OUT/$plan/blob" --data "$DATA" --sliding-stride 32 --out "$OUT/$plan/eval-sliding"
done
# Every eval side by side, best first, each with its chain's config digests and every digest re-verified.
pgolf show "$OUT"/*/eval-* --sort bpb
