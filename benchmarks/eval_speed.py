"""`pgolf eval` speed and gains on one GPU: flat vs stride-64 sliding, n-gram cache, TTT, the cost of a sweep.

    python benchmarks/eval_speed.py --data artifacts/bench1024 --artifact artifacts/run1/blob
    python benchmarks/eval_speed.py --data artifacts/bench1024          # random seed-11l weights: speed only
    python benchmarks/eval_speed.py --data /tmp/data --artifact /tmp/train --device cpu --val-tokens 4000 \\
        --stride 32 --orders 2,3 --alphas 0.2,0.4 --buckets 1024 --ttt-chunk-tokens 1024   # CPU smoke run

Every pass runs pgolf.scoring.score_stream exactly as `pgolf eval` does (one EvalModel, compiled on CUDA and
warmed up once on random tokens; its warm-up seconds are reported, not counted in any pass). One JSON line per
measurement on stdout:
  flat / sliding   targets/s, eval seconds, val_bpb; sliding adds its gain over flat and its time ratio
  ngram_sweep      the --orders x --alphas (x --alpha-modes) grid from one sliding pass: seconds, every point's val_bpb
  ngram_best       the best grid point alone: its gain over the plain sliding pass, seconds
  sweep_cost       sweep seconds / best-point seconds (target <= 1.5), / the top order alone (the chain a
                   sweep builds anyway), / plain sliding; a rough cost of one pass per point instead; and
                   the memory a cache of per-token model distributions (bf16) would need, this split and
                   the full val split (why the sweep shares one pass rather than caching)
  ttt              score-first TTT (--ttt-mode) on the sliding plan: gain over the plain pass, seconds; with
                   --profile, the TTT pass runs under torch.profiler: the 30 costliest ops go to stderr and
                   the row gets `profile` (seconds of device kernels and their share of the pass's wall time:
                   a low share means the pass waits on the host, not the GPU). Profile a short prefix
                   (--val-tokens 262144): the whole split records millions of kernels
Without --artifact the model is seed-11l-shaped with random weights: speeds hold, gains mean nothing.
"""

import argparse
import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import pgolf
from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.config import load_preset, preset_names, resolve
from pgolf.model import GPT, ModelConfig, build_model
from pgolf.ngram import NgramConfig
from pgolf.scoring import EvalModel, EvalPlan, ngram_name, score_stream, warm_up
from pgolf.shards import load_split, open_dataset
from pgolf.stage_model import load_stage_model
from pgolf.ttt import TTTConfig

FULL_VAL_TOKENS = {1024: 62_021_632, 8192: 40_540_160}  # REFERENCE.md


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(record: dict, context: dict) -> None:
    print(json.dumps({**record, **context}, sort_keys=True), flush=True)


def load_model(artifact, device) -> tuple[GPT, str]:
    if artifact:
        state, config, info = load_stage_model(artifact)
        return build_model(state, config, device), f"{info['kind']} artifact {artifact}"
    torch.manual_seed(0)
    config = ModelConfig(**load_preset("train", "seed-11l")["model"])
    return GPT(config).to(device).eval(), "seed-11l, random weights"


def timed_pass(model: EvalModel, tokens, plan, tables, device, **options) -> tuple[dict, float]:
    result = score_stream(model, tokens, plan, tables, device, **options)
    return result.totals, result.eval_seconds


def speed(totals, seconds: float) -> dict:
    model = totals["model"]
    return {"targets": model.targets, "eval_seconds": seconds, "targets_per_second": model.targets / seconds,
            "val_bpb": model.val_bpb}


def progress_log(label: str, every: float = 30.0):
    """A score_stream progress callback that logs targets scored and the rate every `every` seconds: a pass cut
    short (a device call ending) still leaves its speed in the log."""
    began = last = time.perf_counter()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every:
            last = now
            log(f"{label}: {done:,}/{total:,} targets scored in {now - began:.0f} s ({done / (now - began):,.0f}/s)")

    return report


def profile_summary(profiler, wall: float, device) -> dict:
    """The 30 costliest ops to stderr; the seconds of device kernels (CPU: of top-level ops) and their share of
    the profiled wall time."""
    averages = profiler.key_averages()
    on_gpu = device.type == "cuda"
    log(averages.table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total", row_limit=30))
    if on_gpu:
        events = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.self_device_time_total for e in events)
    else:
        events = list(averages)
        busy_us = sum(e.self_cpu_time_total for e in events)
    return {"busy_seconds": busy_us / 1e6, "busy_share_of_wall": busy_us / 1e6 / wall,
            "kernels" if on_gpu else "ops": sum(e.count for e in events)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="shard directory (its val split is scored)")
    parser.add_argument("--artifact", help="train/quantize/compress output (default: random seed-11l)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--val-tokens", type=int, default=0, help="score only this prefix (0 = all)")
    parser.add_argument("--seq-len", type=int, default=0, help="window length (0 = the model's max_seq_len)")
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--batch-seqs", type=int, default=32)
    parser.add_argument("--orders", default="3,5,7", help="n-gram orders of the grid ('' = no grid)")
    parser.add_argument("--alphas", default="0.2,0.4")
    parser.add_argument("--alpha-modes", default="fixed", help="fixed, entropy or both (the grid's third axis)")
    parser.add_argument("--buckets", type=int, default=65536)
    parser.add_argument("--ttt-mode", default="sgd",
                        help="sgd, adamw, lora, phased, batched, a named setting (record-0416, record-1790), or none")
    parser.add_argument("--ttt-chunk-tokens", type=int, default=0, help="0 = the mode's default")
    parser.add_argument("--ttt-compile", default="", help="batched TTT's torch.compile backend (inductor, aot_eager, "
                        "off; default: the mode's setting)")
    parser.add_argument("--ttt-attention-kernel", default="", help="batched TTT's SDPA kernel on CUDA (auto, flash, "
                        "cudnn, efficient; default: the mode's setting)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile the TTT pass (see above)")
    parser.add_argument("--log-every", type=float, default=30.0, help="seconds between the TTT pass's progress lines")
    args = parser.parse_args()

    device = torch.device(args.device)
    model, description = load_model(args.artifact, device)
    config = model.config
    dataset = open_dataset(args.data)
    tokens = load_split(dataset.val)
    tokens = np.asarray(tokens[: args.val_tokens] if args.val_tokens else tokens)
    tables = build_byte_tables(load_tokenizer(dataset.tokenizer), config.vocab_size)
    seq_len = args.seq_len or config.max_seq_len
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    context = {"model": description, "device": str(device), "gpu": gpu, "torch": torch.__version__,
               "pgolf": str(Path(pgolf.__file__).parent.resolve()),
               "val_tokens": len(tokens), "seq_len": seq_len, "batch_seqs": args.batch_seqs}

    eval_model = EvalModel(model, compile=device.type == "cuda" and not args.no_compile)
    warmup_seconds = warm_up(eval_model, config.vocab_size, seq_len, args.batch_seqs, device)
    log(f"{description}: warm-up {warmup_seconds:.1f} s; {len(tokens):,} val tokens on {gpu or device}")
    flat_plan = EvalPlan(seq_len, seq_len, False, args.batch_seqs)
    sliding_plan = EvalPlan(seq_len, args.stride, False, args.batch_seqs)

    flat, flat_seconds = timed_pass(eval_model, tokens, flat_plan, tables, device)
    emit({"measurement": "flat", "warmup_seconds": warmup_seconds, **speed(flat, flat_seconds)}, context)
    sliding, sliding_seconds = timed_pass(eval_model, tokens, sliding_plan, tables, device)
    emit({"measurement": "sliding", "stride": args.stride, **speed(sliding, sliding_seconds),
          "gain_bpb_vs_flat": flat["model"].val_bpb - sliding["model"].val_bpb,
          "seconds_vs_flat": sliding_seconds / flat_seconds}, context)
    plain_bpb = sliding["model"].val_bpb

    grid = [NgramConfig(int(order), float(alpha), mode, buckets=args.buckets) for mode in args.alpha_modes.split(",")
            for order in args.orders.split(",") if order for alpha in args.alphas.split(",")]
    if grid:
        swept, sweep_seconds = timed_pass(eval_model, tokens, sliding_plan, tables, device, ngram=grid)
        points = {ngram_name(c): swept[ngram_name(c)].val_bpb for c in grid}
        emit({"measurement": "ngram_sweep", "stride": args.stride, "points": points, "eval_seconds":
              sweep_seconds, "grid_size": len(grid)}, context)
        best = min(grid, key=lambda c: points[ngram_name(c)])
        alone, best_seconds = timed_pass(eval_model, tokens, sliding_plan, tables, device, ngram=[best])
        emit({"measurement": "ngram_best", "stride": args.stride, **dataclasses.asdict(best),
              "val_bpb": alone[ngram_name(best)].val_bpb, "gain_bpb_vs_sliding": plain_bpb -
              alone[ngram_name(best)].val_bpb, "eval_seconds": best_seconds}, context)
        top = max(grid, key=lambda c: c.order)  # the tables and chain a sweep must build anyway
        top_seconds = best_seconds
        if top.order != best.order:
            _, top_seconds = timed_pass(eval_model, tokens, sliding_plan, tables, device, ngram=[top])
        cache_bytes_per_target = config.vocab_size * 2
        emit({"measurement": "sweep_cost", "grid_size": len(grid), "sweep_seconds": sweep_seconds,
              "sweep_vs_single_ngram_eval": sweep_seconds / best_seconds, "target_ratio": 1.5,
              "top_order_eval_seconds": top_seconds, "sweep_vs_top_order_eval": sweep_seconds / top_seconds,
              "sweep_vs_plain_eval": sweep_seconds / sliding_seconds,
              "one_pass_per_point_seconds_estimate": len(grid) * best_seconds,
              "distribution_cache_gib_this_split": (len(tokens) - 1) * cache_bytes_per_target / 2**30,
              "distribution_cache_gib_full_val": FULL_VAL_TOKENS.get(config.vocab_size, 0) *
              cache_bytes_per_target / 2**30}, context)

    if args.ttt_mode != "none":
        named = args.ttt_mode in preset_names("ttt")
        settings = {} if named else {"mode": args.ttt_mode}
        if args.ttt_chunk_tokens:
            settings["chunk_tokens"] = args.ttt_chunk_tokens
        if args.ttt_compile:
            settings["compile"] = args.ttt_compile
        if args.ttt_attention_kernel:
            settings["attention_kernel"] = args.ttt_attention_kernel
        ttt_config, _ = resolve(TTTConfig, kind="ttt", preset=args.ttt_mode if named else None, env={},
                                overrides=settings)
        started = time.perf_counter()
        activities = [torch.profiler.ProfilerActivity.CPU] + \
            ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) if args.profile else nullcontext() as profiler:
            result = score_stream(eval_model, tokens, sliding_plan, tables, device, ttt_config=ttt_config,
                                  progress=progress_log(f"ttt {args.ttt_mode}", args.log_every))
        wall = time.perf_counter() - started
        totals = result.totals["model"]
        extra = {"profile": profile_summary(profiler, wall, device)} if args.profile else {}
        emit({**extra, "measurement": "ttt", "stride": args.stride, "ttt": dataclasses.asdict(ttt_config),
              "val_bpb": totals.val_bpb, "gain_bpb_vs_sliding": plain_bpb - totals.val_bpb,
              "eval_seconds": result.eval_seconds, "train_seconds": result.ttt.train_seconds,
              "score_seconds": result.ttt.score_seconds, "steps": result.ttt.steps,
              "wall_seconds": wall, "seconds_vs_sliding": result.eval_seconds /
              sliding_seconds}, context)


if __name__ == "__main__":
    main()
