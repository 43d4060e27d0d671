#!/usr/bin/env bash
# Shared protocol, preset `seed-11l`, part 1 of 2 (one device call, <= 10 min): 300 s of training on one GPU, the
# center-out int5 export fitted under 16,000,000 bytes with the bundled code, bundle + verify-size, flat eval of
# the blob and of the float checkpoint (the quantization penalty), then the int6 plan's penalty if time is left.
# The blob and bundle come back in $OUT/seed-export.tgz for part 2 (benchmarks/protocol_eval.sh); every step's
# JSON and log in $OUT/seed-results.tgz (refreshed after each step, so a call cut short still returns them).
#   bash benchmarks/protocol_seed.sh        (on the GPU machine, with .whl and .devdata carried)
T0=$(date +%s); BUDGET=${BUDGET:-470}
source benchmarks/gpu_setup.sh || exit 1
R=artifacts/seed; RES=artifacts/seed-results; mkdir -p $RES
pg() { python3 -m pgolf "$@"; }
save() { [ -n "${OUT:-}" ] && tar czf "$OUT/seed-results.tgz" -C artifacts seed-results; }
time_left() { save; [ $(( $(date +%s) - T0 )) -lt "$BUDGET" ] || { echo "skipped: $1 (time)"; return 1; }; }
pg train $DATA --preset seed-11l --wallclock 300 --val-every 0 --out $R/train --force --json \
  > $RES/s_train.json 2> $RES/s_train.log || { tail -5 $RES/s_train.log; save; exit 1; }
grep -E "^step|val_bpb" $RES/s_train.log | tail -3; save
pg quantize $R/train --plan center-out-int5 --target-bytes 16000000 --code-bytes 60000 --codec zstd \
  --out $R/qc --force --json > $RES/s_qc.json 2> $RES/s_qc.log || tail -3 $RES/s_qc.log
pg compress $R/qc --codec zstd --level 22 --out $R/blob --force --json > $RES/s_blob.json 2> $RES/s_blob.log \
  || tail -3 $RES/s_blob.log
pg eval $R/blob --data $DATA --no-compile --out $R/eval-flat --force --json > $RES/s_eval_flat.json \
  2> $RES/s_eval_flat.log; grep final_ $RES/s_eval_flat.log | tail -1
pg bundle --train $R/train --blob $R/blob --eval $R/eval-flat --name "pgolf seed-11l 1xH100 300s" \
  --github-id pgolf --compress-code --out $R/sub --force --json > $RES/s_bundle.json 2> $RES/s_bundle.log \
  || tail -3 $RES/s_bundle.log
pg verify-size $R/sub --json > $RES/s_size.json 2> $RES/s_size.log; tail -2 $RES/s_size.log
[ -n "${OUT:-}" ] && tar czf "$OUT/seed-export.tgz" -C artifacts seed/blob seed/sub
time_left "eval-pre" && { pg eval $R/train --data $DATA --no-compile --out $R/eval-pre --force --json \
  > $RES/s_eval_pre.json 2> $RES/s_eval_pre.log; grep final_ $RES/s_eval_pre.log | tail -1; }
time_left "int6" && { pg quantize $R/train --plan int6 --out $R/q6 --force --json > $RES/s_q6.json 2> $RES/s_q6.log
  pg compress $R/q6 --codec zstd --level 22 --out $R/blob6 --force --json > $RES/s_blob6.json 2> $RES/s_blob6.log
  pg eval $R/blob6 --data $DATA --no-compile --out $R/eval6 --force --json > $RES/s_eval6.json 2> $RES/s_eval6.log
  grep final_ $RES/s_eval6.log | tail -1; }
echo "elapsed $(( $(date +%s) - T0 )) s"; save
