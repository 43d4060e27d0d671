#!/usr/bin/env bash
# Shared protocol, preset `seed-11l`: 300 s of training on one GPU, center-out int5 export fitted under
# 16,000,000 bytes with the bundled code, bundle + verify-size, then flat / sliding / int6 evaluations as long as
# the device call has time (each later step is skipped past $BUDGET seconds). Results (JSON) go to $OUT.
#   bash benchmarks/protocol_seed.sh        (on the GPU machine, with .whl and .devdata carried)
T0=$(date +%s); BUDGET=${BUDGET:-490}
source benchmarks/gpu_setup.sh || exit 1
R=artifacts/seed; RES=artifacts/seed-results; mkdir -p $RES
pg() { python3 -m pgolf "$@"; }
save() { [ -n "${OUT:-}" ] && tar czf "$OUT/seed-results.tgz" -C artifacts seed-results; }  # results so far, after each step
time_left() { save; [ $(( $(date +%s) - T0 )) -lt "$BUDGET" ] || { echo "skipped: $1 (time)"; return 1; }; }
pg train $DATA --preset seed-11l --wallclock 300 --val-every 0 --out $R/train --force --json \
  > $RES/s_train.json 2> $RES/s_train.log || { tail -5 $RES/s_train.log; exit 1; }
grep -E "^step|val_bpb" $RES/s_train.log | tail -3; save
pg quantize $R/train --plan center-out-int5 --target-bytes 16000000 --code-bytes 60000 --codec zstd \
  --out $R/qc --force --json > $RES/s_qc.json 2> $RES/s_qc.log || tail -3 $RES/s_qc.log
pg compress $R/qc --codec zstd --level 22 --bitpack auto --shuffle auto --out $R/blob --force --json \
  > $RES/s_blob.json 2> $RES/s_blob.log || tail -3 $RES/s_blob.log
pg eval $R/blob --data $DATA --no-compile --out $R/eval-flat --force --json > $RES/s_eval_flat.json \
  2> $RES/s_eval_flat.log; grep final_ $RES/s_eval_flat.log | tail -1
pg bundle --train $R/train --blob $R/blob --eval $R/eval-flat --name "pgolf seed-11l 1xH100 300s" \
  --github-id pgolf --compress-code --out $R/sub --force --json > $RES/s_bundle.json 2> $RES/s_bundle.log \
  || tail -3 $RES/s_bundle.log
pg verify-size $R/sub --json > $RES/s_size.json 2> $RES/s_size.log; tail -2 $RES/s_size.log
time_left "eval-pre" && { pg eval $R/train --data $DATA --no-compile --out $R/eval-pre --force --json \
  > $RES/s_eval_pre.json 2> $RES/s_eval_pre.log; grep final_ $RES/s_eval_pre.log | tail -1; }
time_left "int6" && { pg quantize $R/train --plan int6 --out $R/q6 --force --json > $RES/s_q6.json 2> $RES/s_q6.log
  pg compress $R/q6 --codec zstd --level 22 --out $R/blob6 --force --json > $RES/s_blob6.json 2> $RES/s_blob6.log
  pg eval $R/blob6 --data $DATA --no-compile --out $R/eval6 --force --json > $RES/s_eval6.json 2> $RES/s_eval6.log
  grep final_ $RES/s_eval6.log | tail -1; }
time_left "sliding" && { pg eval $R/blob --data $DATA --sliding-stride 64 --no-compile --out $R/eval-s64 --force \
  --json > $RES/s_eval_s64.json 2> $RES/s_eval_s64.log; grep -E "final_|timers" $RES/s_eval_s64.log | tail -2; }
time_left "ngram" && { pg eval $R/blob --data $DATA --ngram-order 3,5,7 --alpha 0.2,0.4 --no-compile \
  --out $R/eval-ng --force --json > $RES/s_eval_ng.json 2> $RES/s_eval_ng.log; tail -9 $RES/s_eval_ng.log; }
echo "elapsed $(( $(date +%s) - T0 )) s"
save
