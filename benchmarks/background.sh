#!/usr/bin/env bash
# Run one device job past the 600 s a single device command may take: `start` launches it in its own process
# session (setsid: the device keeps such a process running after the command returns, until the machine goes
# back), `wait` follows it from the same or a later command on the still-warm machine, and returns its files.
#   bash benchmarks/background.sh start NAME COMMAND...   the job runs `COMMAND...` with OUT=artifacts/bg/NAME
#                                                        (where protocol scripts write what comes back)
#   bash benchmarks/background.sh wait NAME [SECONDS]    up to SECONDS (default 540): the log's last lines every
#                                                        minute; exits with the job's status, or 124 (running)
#   bash benchmarks/background.sh take NAME              the job's files over 4 MB (a blob's export), in pieces
#                                                        of at most PART_BYTES (default 8 MiB): join them with
#                                                        `cat FILE.part* > FILE`
# Each `wait` copies the job's OUT folder (files up to 4 MB), log, exit status and big.txt (the bigger files'
# sizes and names) into $OUT/NAME-bg.tgz, refreshed every minute, so a command cut short still returns them. The
# big files come back only with `take`, in a call of their own: in session 10 a 16 MB export beside the results
# made the device return no file at all, twice. Chain the waits (each call within the machine's 30 s idle
# window); the job itself is lost when the machine goes back (30 min held at most).
#   run: bash benchmarks/background.sh start ttt env STEPS=ttt bash benchmarks/protocol_eval.sh;
#        bash benchmarks/background.sh wait ttt 560
#   run: bash benchmarks/background.sh wait ttt 560      (next call, while it still runs)
#   run: bash benchmarks/background.sh take ttt          (once it is done, if it wrote a big file)
set -u
action=${1:-}; name=${2:-}
[ -n "$name" ] || { echo "usage: background.sh start NAME COMMAND... | wait NAME [SECONDS] | take NAME" >&2; exit 2; }
DIR=artifacts/bg/$name
case $action in
  start)
    shift 2
    [ $# -gt 0 ] || { echo "background.sh: start $name: no command" >&2; exit 2; }
    if [ -f $DIR/pid ] && [ ! -f $DIR/rc ] && kill -0 "$(cat $DIR/pid)" 2>/dev/null; then
      echo "background.sh: job $name is already running (pid $(cat $DIR/pid))" >&2; exit 2
    fi
    rm -rf $DIR; mkdir -p $DIR/out
    # The job's status lands in rc when it ends; OUT points its results into the job folder.
    # Its own stdio is closed too: a process holding the command's output pipe would keep the command open.
    OUT=$PWD/$DIR/out setsid bash -c '"$@" > "$0/log" 2>&1; echo $? > "$0/rc"' $DIR "$@" > /dev/null 2>&1 < /dev/null &
    echo $! > $DIR/pid
    echo "background.sh: started $name (pid $(cat $DIR/pid)): $*" ;;
  wait)
    limit=${3:-540}
    [ -d $DIR ] || { echo "background.sh: no job $name (start it first)" >&2; exit 2; }
    collect() {
      [ -n "${OUT:-}" ] || return 0
      (cd artifacts/bg && find $name/out -type f -size +4M -printf '%s %p\n') > $DIR/big.txt
      tar czf "$OUT/$name-bg.tgz" --exclude-from=<(cut -d' ' -f2- $DIR/big.txt) -C artifacts/bg $name; }
    started=$SECONDS; last=-60
    while [ ! -f $DIR/rc ] && [ $((SECONDS - started)) -lt "$limit" ]; do
      if [ $((SECONDS - last)) -ge 60 ]; then
        last=$SECONDS; echo "--- $name at $((SECONDS - started)) s"; tail -n 3 $DIR/log 2>/dev/null; collect
      fi
      sleep 2
    done
    collect
    if [ -f $DIR/rc ]; then echo "background.sh: $name exited $(cat $DIR/rc)"; tail -n 5 $DIR/log; exit "$(cat $DIR/rc)"
    else echo "background.sh: $name still running"; exit 124; fi ;;
  take)
    [ -d $DIR ] || { echo "background.sh: no job $name (start it first)" >&2; exit 2; }
    [ -n "${OUT:-}" ] || { echo "background.sh: take $name: OUT is not set" >&2; exit 2; }
    part=${PART_BYTES:-8388608}
    find $DIR/out -type f -size +4M | while read -r file; do
      base=$(basename "$file")
      if [ "$(stat -c %s "$file")" -le "$part" ]; then cp "$file" "$OUT/$base"; echo "$base"
      else split -b "$part" -d "$file" "$OUT/$base.part"; echo "$base in $(ls "$OUT" | grep -c "^$base.part") pieces"
      fi
    done ;;
  *) echo "background.sh: unknown action '$action' (start, wait, take)" >&2; exit 2 ;;
esac
