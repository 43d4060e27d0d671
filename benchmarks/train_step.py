"""Training-step speed of a train preset through the real trainer (model, Muon + Adam, loader, accumulation,
DDP when under torchrun): ms/step, tokens/s and MFU after warm-up, as one JSON line on stdout.

    python benchmarks/train_step.py artifacts/bench-sp1024 --preset baseline
    python benchmarks/train_step.py artifacts/bench-sp1024 --preset seed-11l --batch-tokens 262144
    python benchmarks/train_step.py artifacts/bench-sp1024 --preset baseline --micro-batch-tokens 131072
    torchrun --nproc_per_node=8 benchmarks/train_step.py artifacts/bench-sp1024 --preset baseline
    python benchmarks/train_step.py artifacts/bench-sp1024 --preset tiny --compile off --steps 3  # CPU smoke
    python benchmarks/train_step.py artifacts/bench-sp1024 --preset seed-11l-300s --steps 5 --val

`--val` then times the trainer's validation pass over the whole val split three ways: through the compiled
training model (its first call compiles a forward-only graph, a second call shows the steady cost) and with the
plain module, as `Trainer.validate` runs it.

Target on one H100 (baseline, 524,288 tokens/step, seq 1024): <= 311 ms/step; the challenge's train_gpt.py
runs 366 ms/step there (../shared/data/README.md). MFU counts 6 x matmul parameters (tied head included,
embedding and bigram lookups not) + causal attention 6 x layers x width x seq_len per token, over the bf16
peak x world size.
"""

import argparse
import json
import sys
import time

import torch

from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.dist import finish_distributed, init_distributed
from pgolf.model import GPT, CastedLinear
from pgolf.shards import load_split, open_dataset
from pgolf.train_config import COMPILE_MODES, resolve_configs
from pgolf.trainer import Trainer, flat_val


def flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters each forward runs (a looped block counts once per run;
    tied head included, embedding and bigram lookups not) + causal attention 6 x block runs x width x seq_len."""
    config, layout = model.config, model.layout
    matmul = 0
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            block = layout.block_of(name + ".weight")
            matmul += module.weight.numel() * (layout.runs(block) if block is not None else 1)
    if config.tie_embeddings:
        matmul += model.tok_emb.weight.numel()
    # (QK^T + AV) x 2 FLOPs x 3 passes (forward + backward), half of it masked out by causality.
    attention = 6 * len(layout.execution) * config.model_dim * seq_len
    return 6 * matmul + attention


def profile_steps(trainer: Trainer, steps: int, momentum: float) -> dict:
    """Profile `steps` optimizer steps: print the 30 most expensive kernels (stderr) and return, per step and per
    phase of Trainer's record_function labels, the milliseconds of kernels launched from the phase's own thread
    (`kernel_ms`: misses the backward, which autograd launches from its own thread) and, on CUDA, the span of
    the phase on the GPU timeline (`gpu_span_ms`); on CUDA also `all_kernels_ms`, every kernel's own time (the GPU's
    busy time per step: against the step time it says how launch-bound the step is)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            trainer.train_step(1.0, momentum)
        trainer.synchronize()
    averages = profiler.key_averages()
    sort_key = "cuda_time_total" if trainer.device.type == "cuda" else "cpu_time_total"
    print(averages.table(sort_by=sort_key, row_limit=30), file=sys.stderr)
    phases: dict[str, dict] = {}
    for event in averages:
        if event.key in Trainer.PROFILE_LABELS:
            on_gpu = event.device_type == torch.autograd.DeviceType.CUDA
            total_us = event.device_time_total if trainer.device.type == "cuda" else event.cpu_time_total
            name = "gpu_span_ms" if on_gpu else "kernel_ms"
            phases.setdefault(event.key, {})[name] = round(total_us / 1000.0 / steps, 2)
    if trainer.device.type == "cuda":
        on_gpu = [event for event in averages  # kernels and copies, not the labels' spans
                  if event.device_type == torch.autograd.DeviceType.CUDA and event.key not in Trainer.PROFILE_LABELS]
        busy_us = sum(event.self_device_time_total for event in on_gpu)
        phases["all_kernels_ms"] = round(busy_us / 1000.0 / steps, 2)
    return phases


def time_validation(trainer: Trainer, dataset) -> dict:
    """Seconds and val_bpb of the validation pass: compiled (first call, then again) and eager (the trainer's)."""
    val_tokens = torch.from_numpy(load_split(dataset.val).astype("int32"))
    vocab_size = trainer.model_config.vocab_size
    byte_tables = build_byte_tables(load_tokenizer(dataset.tokenizer), vocab_size).torch(trainer.device)
    batch_seqs = max(trainer.config.micro_tokens(trainer.dist.world_size) // trainer.config.seq_len, 1)
    passes = {"compiled_first": trainer.compiled, "compiled_again": trainer.compiled, "eager": None}
    result = {"val_tokens": len(val_tokens)}
    for name, model in passes.items():
        trainer.synchronize()
        started = time.perf_counter()
        if model is None:
            metrics = trainer.validate(val_tokens, byte_tables)
        else:
            metrics = flat_val(model, val_tokens, trainer.config.seq_len, batch_seqs, byte_tables, trainer.dist,
                               trainer.autocast)
        trainer.synchronize()
        result[f"val_{name}_s"] = round(time.perf_counter() - started, 2)
        result[f"val_{name}_bpb"] = round(metrics["val_bpb"], 6)
    return result


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("data_dir", help="shard directory (only its train shards are read)")
    parser.add_argument("--preset", default="baseline")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compile happens here)")
    parser.add_argument("--batch-tokens", type=int)
    parser.add_argument("--micro-batch-tokens", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--compile", choices=COMPILE_MODES)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak per GPU for MFU")
    parser.add_argument("--out", help="also append the JSON line to this file")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many steps and print the top GPU kernels to stderr")
    parser.add_argument("--val", action="store_true",
                        help="then time the validation pass (compiled first and second call, eager)")
    args = parser.parse_args()

    overrides = dict(batch_tokens=args.batch_tokens, micro_batch_tokens=args.micro_batch_tokens,
                     seq_len=args.seq_len, compile=args.compile, warmup_steps=args.warmup)
    model_config, config, _ = resolve_configs(args.preset, train_overrides=overrides)
    dist_info = init_distributed(fast_math=True)
    dataset = open_dataset(args.data_dir)
    trainer = Trainer(model_config, config, dataset.train, dist_info)
    started = time.perf_counter()
    trainer.warmup()
    warmup_s = time.perf_counter() - started
    if dist_info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist_info.device)
    momentum = trainer.schedule.muon_momentum(0, 0.0)
    trainer.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = trainer.train_step(1.0, momentum)
    trainer.synchronize()
    step_ms = 1000.0 * (time.perf_counter() - started) / args.steps
    tokens_per_s = config.batch_tokens / (step_ms / 1000.0)
    flops = flops_per_token(trainer.model, config.seq_len) * tokens_per_s
    result = {
        "preset": args.preset, "params": trainer.param_count, "batch_tokens": config.batch_tokens,
        "micro_batch_tokens": config.micro_tokens(), "seq_len": config.seq_len,
        "accumulation_steps": trainer.accumulation, "world_size": dist_info.world_size,
        "compile": config.compile, "attention_kernel": trainer.attention_kernel,
        "attention_setting": config.attention_kernel, "warmup_s": round(warmup_s, 1),
        "steps": args.steps,
        "ms_per_step": round(step_ms, 2), "tokens_per_s": round(tokens_per_s),
        "mfu": float(f"{flops / (args.peak_tflops * 1e12 * dist_info.world_size):.4g}"),
        "loss": round(loss.item(), 4), "device": str(dist_info.device), "torch": torch.__version__,
    }
    if dist_info.device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dist_info.device)
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dist_info.device) / 2**30, 2)
    if args.profile:
        result["profile"] = profile_steps(trainer, args.profile, momentum)
    if args.val:
        result["validation"] = time_validation(trainer, dataset)
    if dist_info.is_main:
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
    finish_distributed()


if __name__ == "__main__":
    main()
