#!/usr/bin/env bash
# Shared protocol, part 2 (one device call): eval speed and gains on the seed-11l blob that
# benchmarks/protocol_seed.sh returned (copy RUN-export.tgz into .devdata/ and carry it; RUN defaults to seed):
# flat vs stride-64 sliding tokens/s, the n-gram grid from one pass and its cost against a single eval,
# score-first TTT; then the blob's size under every codec layout.
#   bash benchmarks/protocol_eval.sh        (on the GPU machine, with .whl and .devdata carried)
source benchmarks/gpu_setup.sh || exit 1
RES=${OUT:-artifacts/results}; RUN=${RUN:-seed}
tar xzf .devdata/$RUN-export.tgz -C artifacts || exit 1
python3 benchmarks/eval_speed.py --data $DATA --artifact artifacts/$RUN/blob --stride 64 --orders 3,5,7 \
  --alphas 0.2,0.4 --ttt-mode sgd > $RES/eval_speed.jsonl 2> $RES/eval_speed.log; tail -12 $RES/eval_speed.log
python3 benchmarks/codecs.py artifacts/$RUN/blob --codecs zlib,zstd,lzma > $RES/codecs.jsonl 2> $RES/codecs.log
tail -1 $RES/codecs.jsonl
