#!/usr/bin/env bash
# Shared protocol, one train preset through the whole chain: 300 s of training on one GPU, flat eval of the float
# checkpoint, export with PLAN (center-out-int5 is fitted under 16,000,000 bytes with the bundled code, sized and
# packed with brotli-11), flat eval of the blob (post - pre = the quantization penalty), bundle + verify-size.
# Training ends 6-7 min into a call and the brotli fit takes ~4 min more: run it under `timeout -s INT 550`, then
# again with RESUME=1 in the next call while the machine is still warm.
# Settings come from the environment:
#   RUN (artifacts/RUN, default seed), PRESET (default seed-11l-300s), TRAIN_ARGS (extra `pgolf train` flags),
#   PGOLF_* (any config field, e.g. PGOLF_MATRIX_LR=0.04), PLAN (default center-out-int5; record-int6,
#   int6-sdclip-fit and plan files such as benchmarks/plans/int6-sdclip-k037.toml are fitted and GPTQ-calibrated,
#   from the train stage's Hessians when it saved them),
#   QUANT_ARGS (extra `pgolf quantize` flags), EXPORT=0 (train and eval only), CUDA_VISIBLE_DEVICES (run
#   variants side by side on a multi-GPU host), RESUME=1 (keep the steps whose output a cut-short call on this
#   still-warm machine already wrote; rerun only the rest), VOCAB=8192 (sp8192 shards, for PRESET=sp8192-300s).
# The blob comes back in $OUT/RUN-export.tgz for benchmarks/protocol_eval.sh; every step's JSON and log
# in $OUT/RUN-results.tgz (refreshed after each step, so a call cut short still returns them).
#   bash benchmarks/protocol_seed.sh        (on the GPU machine, with .whl and .devdata carried)
#   RUN=b64k TRAIN_ARGS="--batch-tokens 65536" PLAN=int6 bash benchmarks/protocol_seed.sh
T0=$(date +%s); RUN=${RUN:-seed}; PRESET=${PRESET:-seed-11l-300s}; PLAN=${PLAN:-center-out-int5}; EXPORT=${EXPORT:-1}
source benchmarks/gpu_setup.sh || exit 1
R=artifacts/$RUN; RES=artifacts/$RUN-results; mkdir -p $RES
pg() { python3 -m pgolf "$@"; }
# have DIR: RESUME=1 and DIR holds a finished stage output (stages write their manifest last, atomically).
have() { [ "${RESUME:-0}" = 1 ] && [ -f "$1/manifest.json" ] && echo "$RUN: keeping $1"; }
save() { echo "$1 done at $(( $(date +%s) - T0 )) s" >> $RES/times.txt
  [ -n "${OUT:-}" ] && tar czf "$OUT/$RUN-results.tgz" -C artifacts $RUN-results; }
env | grep ^PGOLF_ > $RES/env.txt
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
have $R/train || pg train $DATA --preset $PRESET --wallclock 300 --val-every 0 $TRAIN_ARGS --out $R/train --force --json \
  > $RES/s_train.json 2> $RES/s_train.log || { tail -5 $RES/s_train.log; save train; exit 1; }
echo "$RUN: $(grep -E "steps \(|val_bpb|timers:" $RES/s_train.log | tail -4 | tr '\n' ' ')"; save train
# The float eval (GPU) runs while quantize sizes blobs (CPU threads).
have $R/eval-pre || pg eval $R/train --data $DATA --no-compile --out $R/eval-pre --force --json > $RES/s_eval_pre.json \
  2> $RES/s_eval_pre.log &
EVAL_PRE=$!
eval_pre_done() { wait $EVAL_PRE; echo "$RUN float: $(grep final_ $RES/s_eval_pre.log | tail -1)"; save eval-pre; }
[ "$EXPORT" = 1 ] || { eval_pre_done; exit 0; }
# Plans with a size fit are fitted under the cap with the bundled code's allowance; GPTQ plans use the Hessians
# the train stage saved (TRAIN_ARGS="--gptq-calibration-batches 16 --gptq-reserve-seconds 4"), else calibrate on
# the train shards (QUANT_ARGS adds any further `pgolf quantize` flags).
FIT=(); case $PLAN in center-out-int5) FIT=(--target-bytes 16000000 --code-bytes 45000) ;;
  record-int6|int6-sdclip-fit|*.toml) FIT=(--target-bytes 16000000 --code-bytes 60000)
    [ -f $R/train/gptq_hessians.safetensors ] || FIT+=(--data $DATA) ;; esac
# shellcheck disable=SC2206  # QUANT_ARGS is a list of flags
FIT+=(${QUANT_ARGS:-})
have $R/q || pg quantize $R/train --plan $PLAN "${FIT[@]}" --out $R/q --force --json > $RES/s_q.json \
  2> $RES/s_q.log || tail -3 $RES/s_q.log; save quantize
eval_pre_done
have $R/blob || pg compress $R/q --codec brotli --out $R/blob --force --json > $RES/s_blob.json 2> $RES/s_blob.log \
  || tail -3 $RES/s_blob.log; save compress
have $R/eval-blob || pg eval $R/blob --data $DATA --no-compile --out $R/eval-blob --force --json > $RES/s_eval_blob.json \
  2> $RES/s_eval_blob.log; echo "$RUN $PLAN: $(grep final_ $RES/s_eval_blob.log | tail -1)"; save eval-blob
pg bundle --train $R/train --blob $R/blob --eval $R/eval-blob --name "pgolf $PRESET 1xH100 300s" \
  --github-id pgolf --compress-code --out $R/sub --force --json > $RES/s_bundle.json 2> $RES/s_bundle.log \
  || tail -3 $RES/s_bundle.log
pg verify-size $R/sub --json > $RES/s_size.json 2> $RES/s_size.log; tail -2 $RES/s_size.log
# The device returns files of at most 16 MiB: the blob alone (a ~16 MB blob twice, with the bundle's copy, was
# silently left out); the bundle's other files go with the results.
[ -d $R/sub ] && mkdir -p $RES/sub && find $R/sub -maxdepth 1 -type f ! -name '*.blob' -exec cp {} $RES/sub/ \;
[ -n "${OUT:-}" ] && tar czf "$OUT/$RUN-export.tgz" -C artifacts $RUN/blob
save all; tail -1 $RES/times.txt
