#!/usr/bin/env bash
# On a CUDA machine: a bundled train_gpt.py scores a blob exactly as `pgolf eval` does, and its train command runs
# the whole flow (train, quantize with the run's plan, compress, eval) there.
#
#   RUN=.devdata/demo BUNDLES="submission-new submission-old" bash benchmarks/bundle_gpu_check.sh
#
# RUN holds a demo run (scripts/demo.sh: data/, blob/, and bundles of that blob, each made with `pgolf bundle
# --eval` of a sliding-32 eval). Prints one line per scorer: `pgolf eval`, then each bundle's `train_gpt.py eval`
# (their val_loss/val_bpb must agree to the last digit with pgolf's for bundles made by this pgolf), then the
# first bundle's `train_gpt.py train` for ITERATIONS steps.
set -euo pipefail
RUN=${RUN:?a demo run directory}
BUNDLES=${BUNDLES:-submission}
ITERATIONS=${ITERATIONS:-30}
export DATA=$RUN/data  # gpu_setup.sh: shards already here, nothing to tokenize
source benchmarks/gpu_setup.sh
work=$(mktemp -d)
python3 -m pgolf eval "$RUN/blob" --data "$RUN/data" --sliding-stride 32 --out "$work/eval" --json > "$work/eval.json"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"pgolf eval       val_loss:{r['val_loss']:.8f} val_bpb:{r['val_bpb']:.8f} ({r['device']})\")" "$work/eval.json"
for bundle in $BUNDLES; do
  line=$(cd "$RUN/$bundle" && python3 train_gpt.py eval --data "$(realpath ../data)" | grep final_roundtrip_exact)
  echo "$bundle eval  ${line#final_roundtrip_exact }"
done
first=${BUNDLES%% *}
(cd "$RUN/$first" && python3 train_gpt.py train --data "$(realpath ../data)" --iterations "$ITERATIONS" \
  --out "$work/retrain" > "$work/retrain.log" 2>&1) || { tail -5 "$work/retrain.log"; exit 1; }
grep -E "Total submission size|final_roundtrip_exact" "$work/retrain.log" | sed "s/^/$first train  /"
