#!/usr/bin/env bash
# Shared protocol, several variants of benchmarks/protocol_seed.sh side by side: one per GPU of the machine (a
# GPU that finishes takes the next waiting variant), so a 4-GPU call trains four 300 s runs in one command's time.
# Each SPEC is RUN:PRESET[:VAR=VALUE[,VAR=VALUE...]] (VARs: any protocol_seed.sh setting or PGOLF_* field);
# presets named sp8192-* or record-* read the sp8192 shards. Training and the float eval only (EXPORT=0) unless
# EXPORT=1 is set. Results: each run's $OUT/RUN-results.tgz (protocol_seed.sh's), its log in $OUT/sweep/RUN.log,
# and $OUT/sweep/summary.json: per run its pre-quant flat val_bpb (the float checkpoint's whole-val eval), steps,
# ms/step and the GPU it ran on, rewritten as runs finish.
#   bash benchmarks/protocol_sweep.sh sp1:sp8192-300s:PGOLF_SEED=1 sp2:sp8192-300s:PGOLF_SEED=2 \
#     s1:seed-11l-300s:PGOLF_SEED=1 s2:seed-11l-300s:PGOLF_SEED=2       (#14 item 6, 2 seeds each)
#   bash benchmarks/protocol_sweep.sh b64:sp8192-300s:PGOLF_BATCH_TOKENS=65536 b131:sp8192-300s:PGOLF_BATCH_TOKENS=131072
[ $# -gt 0 ] || { echo "usage: protocol_sweep.sh RUN:PRESET[:VAR=VALUE,...]..." >&2; exit 2; }
for spec in "$@"; do
  [[ $spec =~ ^[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+(:.*)?$ ]] || { echo "protocol_sweep.sh: bad spec '$spec'" >&2; exit 2; }
done
vocab_of() { case $1 in sp8192-*|record-*) echo 8192 ;; *) echo 1024 ;; esac; }
# The shards are tokenized here, once per vocabulary, before any variant starts (two variants tokenizing into
# one folder at once would race).
for vocab in $(for spec in "$@"; do vocab_of "$(cut -d: -f2 <<< "$spec")"; done | sort -u); do
  VOCAB=$vocab source benchmarks/gpu_setup.sh || exit 1; unset DATA
done
SW=${OUT:-artifacts}/sweep; mkdir -p $SW
gpus=$(nvidia-smi -L | wc -l); [ "$gpus" -ge 1 ] || { echo "protocol_sweep.sh: no GPU" >&2; exit 1; }
summarize() {
  python3 - "$SW" "$@" <<'PY'
import json, pathlib, sys
out, rows = pathlib.Path(sys.argv[1]), {}
for spec in sys.argv[2:]:
    run = spec.split(":")[0]
    res, row = pathlib.Path("artifacts") / f"{run}-results", {"spec": spec}
    for key, name in (("train", "s_train.json"), ("eval_pre", "s_eval_pre.json")):
        try:
            row[key] = json.loads((res / name).read_text())
        except (OSError, ValueError):
            pass
    metrics = row.pop("train", {}).get("metrics", {})
    row |= {"steps": metrics.get("steps"), "ms_per_step": metrics.get("ms_per_step"),
            "pre_quant_val_bpb": row.pop("eval_pre", {}).get("val_bpb")}
    gpu = out / f"{run}.gpu"
    row["gpu"] = gpu.read_text().strip() if gpu.exists() else None
    rows[run] = row
(out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
print(json.dumps({run: row["pre_quant_val_bpb"] for run, row in rows.items()}))
PY
}
# Worker g runs the variants g, g + gpus, g + 2 gpus, ... in turn on GPU g.
specs=("$@")
for ((g = 0; g < gpus && g < ${#specs[@]}; g++)); do
  (
    for ((i = g; i < ${#specs[@]}; i += gpus)); do
      IFS=: read -r run preset vars <<< "${specs[$i]}"
      echo "$g $(nvidia-smi -i $g --query-gpu=name --format=csv,noheader)" > $SW/$run.gpu
      # shellcheck disable=SC2046  # vars is a comma-separated list of VAR=VALUE words
      env CUDA_VISIBLE_DEVICES=$g RUN=$run PRESET=$preset VOCAB=$(vocab_of $preset) EXPORT=${EXPORT:-0} \
        $(tr , ' ' <<< "$vars") bash benchmarks/protocol_seed.sh > $SW/$run.log 2>&1
      echo "$run exited $? on GPU $g: $(tail -n 1 $SW/$run.log)"
      summarize "${specs[@]}" > /dev/null
    done
  ) &
done
wait
summarize "${specs[@]}"
