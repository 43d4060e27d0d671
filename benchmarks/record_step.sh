#!/usr/bin/env bash
# Step time of the 04-16 record's own train_gpt.py against pgolf's `record-0416` preset, one GPU, same call.
# The record runs with ../shared/reference/flash_attn_interface.py standing in for FlashAttention-3 (dense causal ->
# SDPA, varlen -> flex_attention with a document mask), on the benchmark corpus tokenized with sp8192 by
# `pgolf tokenize` (VOCAB=8192 benchmarks/gpu_setup.sh). Both sides run the record's per-GPU micro-batch (98,304
# tokens = 786,432 / 8) with the loops on from step 0 (ENABLE_LOOPING_AT=0: the steady state after 35 % of a run),
# and no compile warm-up for the record (WARMUP_STEPS=0: its bucketed warm-up takes > 300 s with the stand-in),
# so its compiles land in the first steps; its ms/step is taken between two logged steps well after them.
# Needs in .devdata/ (git-ignored, carried with .whl): blogs-125MB.jsonl.zst, fineweb_8192_bpe.model, and reference/
# with record_0416.py (the record's train_gpt.py) and flash_attn_interface.py: `bash benchmarks/device_prep.sh` on the
# dev box makes them.
#   SECS=200 bash benchmarks/record_step.sh      (on the GPU machine; results in $OUT/record_step/)
SECS=${SECS:-200}; STEPS=${STEPS:-20}; RES=${OUT:-artifacts}/record_step; mkdir -p $RES
VOCAB=8192 source benchmarks/gpu_setup.sh || exit 1
RD=$(pwd)/artifacts/record-data; mkdir -p $RD/datasets $RD/tokenizers artifacts/record-run
ln -sfn $(realpath $DATA) $RD/datasets/fineweb10B_sp8192
ln -sf $(realpath .devdata/fineweb_8192_bpe.model) $RD/tokenizers/fineweb_8192_bpe.model
nvidia-smi --query-gpu=name --format=csv,noheader > $RES/gpu.txt
# pgolf first (its own warm-up is untimed): the preset's micro-batch is the record's per-GPU batch.
PGOLF_ENABLE_LOOPING_AT=0 python3 benchmarks/train_step.py $DATA --preset record-0416 --steps $STEPS --warmup 8 --out $RES/pgolf.jsonl \
  2> $RES/pgolf.log | tail -1
( cd artifacts/record-run && PYTHONPATH=$(realpath ../../.devdata/reference):${PYTHONPATH:-} DATA_DIR=$RD \
  VOCAB_SIZE=8192 SMEAR_GATE=1 SMEAR_GATE_WIDTH=12 GATE_ATTN_OUT=1 GATE_ATTN_SRC=proj GATE_WIDTH=12 \
  QK_GAIN_INIT=5.25 TTT_ENABLED=0 ENABLE_LOOPING_AT=0 WARMUP_STEPS=0 TRAIN_LOG_EVERY=10 VAL_LOSS_EVERY=0 \
  ITERATIONS=100000 MAX_WALLCLOCK_SECONDS=$((SECS + 13)) RUN_ID=record \
  timeout -s KILL $((SECS + 90)) python3 ../../.devdata/reference/record_0416.py ) > $RES/record.log 2>&1
# tok/s on each log line is a running average from step 0: two lines give the time between them.
python3 - $RES/record.log <<'PY' | tee $RES/record.json
import json, re, sys
rows = [(int(m[1]), int(m[2])) for m in re.finditer(r"^(\d+)/\d+ train_loss: \S+ train_time: \S+ tok/s: (\d+)",
                                                    open(sys.argv[1]).read(), re.M)]
batch = 786432
if len(rows) < 3:
    print(json.dumps({"error": "fewer than 3 logged steps", "rows": rows})); sys.exit()
seconds = {step: step * batch / rate for step, rate in rows}
first = rows[len(rows) // 3][0]; last = rows[-1][0]
print(json.dumps({"record_ms_per_step": round(1000 * (seconds[last] - seconds[first]) / (last - first), 2),
                  "from_step": first, "to_step": last, "logged": rows[-4:]}))
PY
