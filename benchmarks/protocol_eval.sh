#!/usr/bin/env bash
# Shared protocol, part 2 (one device call): eval speed and gains on the seed-11l blob of
# benchmarks/protocol_seed.sh (artifacts/RUN/blob on a still-warm machine, else RUN-export.tgz copied into .devdata/
# and carried; RUN defaults to seed). STEPS picks among:
#   speed    benchmarks/eval_speed.py: flat vs stride-64 sliding tokens/s, the n-gram grid from one pass and its cost
#            against a single eval, score-first TTT; on the first VAL_TOKENS val tokens (default 0 = all);
#            ALPHA_MODES=fixed,entropy adds the entropy-adaptive weights to the grid (12 points)
#   codecs   the blob's size under every codec layout (one CPU process per codec, beside the GPU steps)
#   sliding  `pgolf eval` of the blob, stride 64 on the whole val split (the artifact's headline score)
#   ttt      eval_speed.py's flat + stride-64 sliding passes, then TTT_MODE (default record-1790: doc-batched LoRA +
#            phased SGD) on the first VAL_TOKENS val tokens: its gain over sliding from the same call, seconds;
#            with PGOLF_PREV=DIR (an older pgolf's source tree carried in .devdata) the same first under that
#            pgolf, for the speed of a TTT change against its baseline in one call; TTT_ARGS adds eval_speed.py
#            flags (TTT_ARGS=--profile: where the TTT pass spends its time); TTT_VARIANTS runs this pgolf once more
#            per listed variant: compiled (--ttt-compile inductor), cudnn (--ttt-attention-kernel cudnn), or both
#            joined by + (TTT_VARIANTS="compiled cudnn compiled+cudnn")
#   bash benchmarks/protocol_eval.sh        (on the GPU machine, with .whl and .devdata carried)
#   STEPS=speed VAL_TOKENS=1048576 RUN=a bash benchmarks/protocol_eval.sh
#   bash benchmarks/background.sh start ttt env STEPS=ttt bash benchmarks/protocol_eval.sh   (whole val: longer
#   than one device command; then `bash benchmarks/background.sh wait ttt 560` in this and the next calls)
source benchmarks/gpu_setup.sh || exit 1
RES=${OUT:-artifacts/results}; RUN=${RUN:-seed}; STEPS=${STEPS:-speed codecs sliding}; B=artifacts/$RUN/blob
[ -f $B/manifest.json ] || tar xzf .devdata/$RUN-export.tgz -C artifacts || exit 1
codecs() {  # one process per codec: each times its layouts one at a time, the four run side by side
  for c in zlib zstd lzma brotli; do
    python3 benchmarks/codecs.py $B --codecs $c > $B-codecs-$c.jsonl 2> $B-codecs-$c.log & done; wait
  cat $B-codecs-*.jsonl > $RES/$RUN-codecs.jsonl; cat $B-codecs-*.log > $RES/$RUN-codecs.log
  grep -h summary $B-codecs-*.jsonl | cut -c1-300; }
CODECS=; case " $STEPS " in *" codecs "*) codecs & CODECS=$! ;; esac
for step in $STEPS; do case $step in
  speed) python3 benchmarks/eval_speed.py --data $DATA --artifact $B --stride 64 --orders 3,5,7 --alphas 0.2,0.4 \
      --alpha-modes "${ALPHA_MODES:-fixed}" --ttt-mode sgd --val-tokens "${VAL_TOKENS:-0}" > $RES/$RUN-eval_speed.jsonl 2> $RES/$RUN-eval_speed.log
    tail -2 $RES/$RUN-eval_speed.log; cut -c1-600 $RES/$RUN-eval_speed.jsonl ;;
  codecs) ;;  # started above
  sliding) python3 -m pgolf eval $B --data $DATA --sliding-stride 64 --out artifacts/$RUN/eval-s64 --force --json \
      > $RES/$RUN-eval_s64.json 2> $RES/$RUN-eval_s64.log; tail -3 $RES/$RUN-eval_s64.log ;;
  ttt) for tree in ${PGOLF_PREV:+prev} now ${TTT_VARIANTS:-}; do
      [ $tree = prev ] && path=$PGOLF_PREV || path=.
      extra=
      case $tree in prev|now) ;; *) for part in ${tree//+/ }; do case $part in
        compiled) extra="$extra --ttt-compile inductor" ;;
        cudnn) extra="$extra --ttt-attention-kernel cudnn" ;;
        *) echo "protocol_eval.sh: unknown TTT variant $part (compiled, cudnn)"; exit 2 ;;
      esac; done ;; esac
      # shellcheck disable=SC2086  # TTT_ARGS is a list of flags
      PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/eval_speed.py --data $DATA --artifact $B --stride 64 --orders '' \
        --ttt-mode "${TTT_MODE:-record-1790}" --val-tokens "${VAL_TOKENS:-0}" ${TTT_ARGS:-} $extra > $RES/$RUN-ttt-$tree.jsonl \
        2> $RES/$RUN-ttt-$tree.log
      tail -2 $RES/$RUN-ttt-$tree.log; cut -c1-400 $RES/$RUN-ttt-$tree.jsonl; done ;;
  *) echo "protocol_eval.sh: unknown step $step (speed, codecs, sliding, ttt)"; exit 2 ;;
esac; done
[ -z "$CODECS" ] || wait $CODECS
