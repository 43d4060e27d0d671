"""Quantization penalty: artifact bytes and post - pre val_bpb of every plan x clip method on one checkpoint.

    python benchmarks/quant_penalty.py artifacts/run1/train --data artifacts/bench1024
    python benchmarks/quant_penalty.py artifacts/run1/train --data artifacts/bench1024 \\
        --plans int8,int6,center-out-int5 --clips percentile,gptq-lite,gptq --stride 64
    python benchmarks/quant_penalty.py /tmp/train --data /tmp/data --keep-float-numel 1024 \\
        --val-tokens 20000 --device cpu                                  # CPU smoke run on a tiny model

Each row runs the shipped command (`pgolf quantize ... --json` in a subprocess, so GPTQ, sensitivity and the
--target-bytes fit are exactly what users get), loads the output as `pgolf eval` does (pgolf.stage_model), and
scores the validation split with pgolf.scoring (flat windows of the model's max_seq_len unless --stride).
The float checkpoint is scored once first. Calibration (GPTQ, sensitivity) reads only the train shards.

One JSON line per row on stdout: plan, clip, artifact_bytes (blob + --code-bytes), blob_bytes, demoted blocks,
mean_rel_error, pre/post val_loss and val_bpb, delta_bpb, quantize_seconds, eval_seconds, device, torch.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.model import build_model
from pgolf.plans import load_plan
from pgolf.scoring import EvalModel, EvalPlan, score_stream, warm_up
from pgolf.shards import load_split, open_dataset
from pgolf.stage_model import load_stage_model

PLANS = ("int8", "int6", "int6-fp16emb", "center-out-int5", "sensitivity-int5")
CLIPS = ("percentile", "gptq-lite", "gptq")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_dir", type=Path, help="a `pgolf train` output directory")
    parser.add_argument("--data", type=Path, required=True, help="token shards + tokenizer (train and val)")
    parser.add_argument("--plans", default=",".join(PLANS), help="comma-separated plan presets or plan files")
    parser.add_argument("--clips", default=",".join(CLIPS), help="comma-separated clip methods")
    parser.add_argument("--target-bytes", type=int, default=16_000_000, help="cap for the demote plans")
    parser.add_argument("--code-bytes", type=int, default=100_000, help="code allowance added when sizing")
    parser.add_argument("--codec", default="zstd", help="codec for sizing (as pgolf quantize --codec)")
    parser.add_argument("--calib-tokens", type=int, default=131_072, help="train tokens for GPTQ/sensitivity")
    parser.add_argument("--keep-float-numel", type=int, default=65_536, help="as pgolf quantize")
    parser.add_argument("--stride", type=int, default=0, help="sliding-window stride (0: flat windows)")
    parser.add_argument("--batch-seqs", type=int, default=32, help="windows per forward pass")
    parser.add_argument(
        "--val-tokens", type=int, default=0, help="score only the first N val tokens (0: all)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def score(artifact: Path, tokens, tables, args) -> dict:
    """val_loss / val_bpb of a train or quantize output, as pgolf eval scores it (model only, no n-gram)."""
    state, config, _ = load_stage_model(artifact)
    device = torch.device(args.device)
    model = EvalModel(build_model(state, config, device), compile=device.type == "cuda")
    seq_len = config.max_seq_len
    plan = EvalPlan(seq_len, args.stride or seq_len, False, args.batch_seqs)
    warm_up(model, config.vocab_size, seq_len, args.batch_seqs, device)
    totals = score_stream(model, tokens, plan, tables, device).totals["model"]
    return {"val_loss": totals.val_loss, "val_bpb": totals.val_bpb, "targets": totals.targets}


def quantize(args, plan: str, clip: str, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "pgolf",
        "quantize",
        str(args.train_dir),
        "--out",
        str(out),
        "--force",
        "--json",
        "--plan",
        plan,
        "--clip",
        clip,
        "--data",
        str(args.data),
        "--calib-tokens",
        str(args.calib_tokens),
        "--code-bytes",
        str(args.code_bytes),
        "--codec",
        args.codec,
        "--keep-float-numel",
        str(args.keep_float_numel),
        "--device",
        args.device,
    ]
    if load_plan(plan).demote:  # other plans are measured whatever their size
        command += ["--target-bytes", str(args.target_bytes)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1], "exit_code": result.returncode}
    return {**json.loads(result.stdout), "quantize_seconds": time.perf_counter() - started}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    dataset = open_dataset(args.data)
    tokens = load_split(dataset.val)
    if args.val_tokens:
        tokens = tokens[: args.val_tokens]
    tables = build_byte_tables(load_tokenizer(dataset.tokenizer))
    started = time.perf_counter()
    pre = score(args.train_dir, tokens, tables, args)
    log(
        f"float checkpoint: val_bpb {pre['val_bpb']:.5f} over {pre['targets']:,} targets "
        f"({time.perf_counter() - started:.1f} s)"
    )
    environment = {
        "device": args.device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    with tempfile.TemporaryDirectory() as scratch:
        for plan in args.plans.split(","):
            for clip in args.clips.split(","):
                row = {
                    "plan": plan,
                    "clip": clip,
                    "pre_val_loss": pre["val_loss"],
                    "pre_val_bpb": pre["val_bpb"],
                    **environment,
                }
                quantized = quantize(args, plan, clip, Path(scratch) / "q")
                if "error" in quantized:
                    print(json.dumps({**row, **quantized}), flush=True)
                    continue
                started = time.perf_counter()
                post = score(Path(scratch) / "q", tokens, tables, args)
                fit = quantized["fit"] or {}
                row.update(
                    {
                        "artifact_bytes": quantized["artifact_bytes"],
                        "blob_bytes": quantized["blob_bytes"],
                        "demoted": fit.get("demoted", []),
                        "mean_rel_error": quantized["totals"]["mean_rel_error"],
                        "post_val_loss": post["val_loss"],
                        "post_val_bpb": post["val_bpb"],
                        "delta_bpb": post["val_bpb"] - pre["val_bpb"],
                        "targets": post["targets"],
                        "quantize_seconds": round(quantized["quantize_seconds"], 2),
                        "eval_seconds": round(time.perf_counter() - started, 2),
                    }
                )
                log(
                    f"{plan} / {clip}: {row['artifact_bytes']:,} bytes, bpb {row['post_val_bpb']:.5f} "
                    f"({row['delta_bpb']:+.5f})"
                )
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
