#!/usr/bin/env bash
# Source on the GPU machine before a protocol run: installs the carried wheels (.whl) and pgolf (no network),
# then tokenizes the benchmark corpus (../shared/data/README.md protocol) into artifacts/bench-data once (VOCAB=8192:
# artifacts/bench-data-sp8192).
# The wheels (.whl) and the corpus and tokenizers (.devdata) are git-ignored folders benchmarks/device_prep.sh makes
# on the dev box; carry both.
export PYTHONUNBUFFERED=1
# Two protocol runs share a 2-GPU host's 32 cores: cap each process's OpenMP threads (oversubscribed OpenMP spins;
# a checkpoint load took 41 s there with two runs side by side against 4 s on the 2-core dev box).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONPATH=/tmp/site
# Once per machine: several protocol scripts may source this in one call.
if ! python3 -c "import zstandard, brotli, pgolf.stages" 2>/dev/null; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || return 1
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || return 1
fi
SETUP=artifacts/setup; mkdir -p $SETUP
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $SETUP/gpu.txt
# VOCAB=8192 tokenizes the same corpus with the sp8192 tokenizer (the SP8192 record stack's) instead.
VOCAB=${VOCAB:-1024}
if [ "$VOCAB" = 1024 ]; then DATA=${DATA:-artifacts/bench-data}; else DATA=${DATA:-artifacts/bench-data-sp$VOCAB}; fi
if [ ! -f $DATA/manifest.json ]; then
  /usr/bin/time -f "tokenize wall %e s" python3 -m pgolf tokenize .devdata/blogs-125MB.jsonl.zst \
    --tokenizer .devdata/fineweb_${VOCAB}_bpe.model --val-docs 10000 --out $DATA --force --json \
    > $SETUP/tokenize.json 2> $SETUP/tokenize.log || { tail -3 $SETUP/tokenize.log; return 1; }
  tail -1 $SETUP/tokenize.log
fi
