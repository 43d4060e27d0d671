"""The 300 s quality protocol (../shared/data/README.md) for train presets, through the shipped commands:
train on one GPU for 300 s of training time, quantize + compress under 16,000,000 bytes, evaluate flat
windows. One JSON line per preset on stdout, with the challenge script's reference for `baseline`.

Prepare the benchmark split once (first 10,000 documents are validation):
    pgolf tokenize ../shared/data/bench/blogs-125MB.jsonl.zst \\
        --tokenizer ../shared/data/tokenizers/fineweb_1024_bpe.model --val-docs 10000 \\
        --out artifacts/bench-sp1024
Then:
    python benchmarks/train_quality.py artifacts/bench-sp1024 --presets baseline seed-11l
    python benchmarks/train_quality.py artifacts/bench-sp1024 --presets seed-11l \\
        --train-args --batch-tokens 524288
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

# The challenge's train_gpt.py on this protocol, one H100 (../shared/data/README.md).
CHALLENGE_BASELINE = {"steps": 820, "ms_per_step": 366, "val_bpb": 1.5168, "roundtrip_val_bpb": 1.5203}
# How each preset is exported: the baseline as the challenge does (int8), the seed stack as the seeds did.
QUANTIZE_PLANS = {"baseline": ["--plan", "int8"], "seed-11l": ["--plan", "center-out-int5"]}


def pgolf(*args) -> None:
    command = [sys.executable, "-m", "pgolf", *map(str, args)]
    print("$ " + " ".join(command[2:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def metrics(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())["metrics"]


def run_preset(preset: str, args) -> dict:
    root = Path(args.root) / preset
    train, quantized, blob, evaluated = (root / name for name in ("train", "q", "blob", "eval"))
    pgolf("train", args.data_dir, "--preset", preset, "--wallclock", args.wallclock, "--out", train,
          "--force", *args.train_args)
    plan = QUANTIZE_PLANS.get(preset, ["--plan", "int6"])
    pgolf("quantize", train, *plan, "--target-bytes", 16_000_000, "--data", args.data_dir, "--out", quantized,
          "--force")
    pgolf("compress", quantized, "--codec", "auto", "--out", blob, "--force")
    pgolf("eval", blob, "--data", args.data_dir, "--out", evaluated, "--force")
    trained, packed, scored = metrics(train), metrics(blob), metrics(evaluated)
    result = {
        "preset": preset, "wallclock_s": args.wallclock, "steps": trained["steps"],
        "ms_per_step": round(trained["ms_per_step"], 1), "tokens_seen": trained["tokens_seen"],
        "weights": trained["weights"], "val_bpb": round(trained["val_bpb"], 4),
        "master_val_bpb": round(trained["master"]["val_bpb"], 4),
        "blob_bytes": packed["bytes"], "roundtrip_val_bpb": round(scored["val_bpb"], 4),
    }
    if preset == "baseline":
        result["challenge_script"] = CHALLENGE_BASELINE
    return result


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("data_dir", help="the tokenized benchmark corpus")
    parser.add_argument("--presets", nargs="+", default=["baseline", "seed-11l"])
    parser.add_argument("--wallclock", type=float, default=300.0, help="training seconds")
    parser.add_argument("--root", default="artifacts/train_quality", help="where each preset's outputs go")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="extra `pgolf train` flags (last on the command line)")
    args = parser.parse_args()
    for preset in args.presets:
        print(json.dumps(run_preset(preset, args)), flush=True)


if __name__ == "__main__":
    main()
