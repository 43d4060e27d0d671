#!/usr/bin/env bash
# Shared protocol, preset `baseline` (the challenge's naive baseline): 300 s of training on one GPU, then the
# baseline's own export (int8 per-row + zlib-9) and flat + sliding evaluation. Results (JSON) go to $OUT.
#   bash benchmarks/protocol_baseline.sh        (on the GPU machine, with .whl and .devdata carried)
source benchmarks/gpu_setup.sh || exit 1
R=artifacts/baseline; RES=${OUT:-artifacts/results}
pg() { python3 -m pgolf "$@"; }
pg train $DATA --preset baseline --wallclock 300 --val-every 0 --micro-batch-tokens 262144 --out $R/train \
  --force --json > $RES/b_train.json 2> $RES/b_train.log || { tail -5 $RES/b_train.log; exit 1; }
grep -E "^step" $RES/b_train.log | tail -2
pg quantize $R/train --plan int8 --out $R/q --force --json > $RES/b_quant.json 2> $RES/b_quant.log
pg compress $R/q --codec zlib --level 9 --out $R/blob --force --json > $RES/b_blob.json 2> $RES/b_blob.log
pg eval $R/blob --data $DATA --no-compile --out $R/eval-flat --force --json > $RES/b_eval_flat.json 2> $RES/b_eval_flat.log
pg eval $R/train --data $DATA --no-compile --out $R/eval-pre --force --json > $RES/b_eval_pre.json 2> $RES/b_eval_pre.log
pg eval $R/blob --data $DATA --sliding-stride 64 --no-compile --out $R/eval-s64 --force --json > $RES/b_eval_s64.json \
  2> $RES/b_eval_s64.log
for f in b_eval_pre b_eval_flat b_eval_s64; do grep final_ $RES/$f.log | tail -1; done
tail -c 600 $RES/b_blob.json; echo
