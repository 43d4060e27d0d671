#!/usr/bin/env bash
# Source on the GPU machine before a protocol run: installs the carried wheels (.whl) and pgolf (no network),
# then tokenizes the benchmark corpus (../shared/data/README.md protocol) into artifacts/bench-data once.
# The corpus and tokenizer travel in a git-ignored .devdata/ folder: copy them from ../shared/data and carry it.
export PYTHONUNBUFFERED=1
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || return 1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || return 1
RES=${OUT:-artifacts/results}; mkdir -p "$RES"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RES/gpu.txt"
DATA=artifacts/bench-data
if [ ! -f $DATA/manifest.json ]; then
  /usr/bin/time -f "tokenize wall %e s" python3 -m pgolf tokenize .devdata/blogs-125MB.jsonl.zst \
    --tokenizer .devdata/fineweb_1024_bpe.model --val-docs 10000 --out $DATA --force --json \
    > "$RES/tokenize.json" 2> "$RES/tokenize.log" || { tail -3 "$RES/tokenize.log"; return 1; }
  tail -1 "$RES/tokenize.log"
fi
