"""Model training-step throughput on one GPU: forward + backward ms per micro-batch, tokens/s and MFU, for the
train presets' models and for each technique added alone to the baseline, under torch.compile (fullgraph, so a
graph break fails the variant) and bf16 autocast, with the challenge's dtype placement (bf16 model, fp32
CastedLinear weights and control parameters). QAT variants measure a plan's cost with the switch off and on.

The optimizer is not included (pgolf.optim has its own benchmark); the numbers isolate the model.

    python benchmarks/bench_model.py                                    # every variant, 64 x 1024 tokens
    python benchmarks/bench_model.py --variants baseline seed-11l --out benchmarks/model.jsonl
    python benchmarks/bench_model.py --device cpu --tiny --steps 2 --warmup 1   # smoke run, no real timing

One JSON object per variant on stdout; a table with each variant's ratio to the first one on stderr.
"""

import argparse
import dataclasses
import json
import sys
import time

import torch

from pgolf.config import load_preset
from pgolf.model import (
    GPT,
    CastedLinear,
    ModelConfig,
    casted_linear_names,
    set_qat_enabled,
    set_qat_plan,
)
from pgolf.trainer import bf16_training_dtypes

# Technique variants: the baseline with one ModelConfig change.
SINGLE_FEATURES = {
    "+mlp3": dict(mlp_mult=3.0),
    "+leaky-relu2": dict(activation="leaky_relu2"),
    "+swiglu": dict(activation="swiglu"),
    "+xsa-all": dict(xsa_last_n=-1),
    "+smear-gate": dict(smear_gate=True),
    "+bigram-4096": dict(bigram_buckets=4096, bigram_dim=128),
    "+partial-rope-16": dict(rope_dims=16),
    "+ln-scale": dict(ln_scale=True),
    "+value-residual": dict(value_residual=True),
    "+gated-attention": dict(gated_attention=True),
    "+attn-out-gate-12": dict(attn_out_gate_width=12),
}
QAT_VARIANTS = {"+qat-int6-off": False, "+qat-int6-on": True}
PRESET_VARIANTS = ("baseline", "seed-11l")
TINY = dict(vocab_size=256, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, max_seq_len=64)


def preset_model_config(name: str) -> ModelConfig:
    return ModelConfig(**load_preset("train", name)["model"])


def variant_config(name: str, tiny: bool) -> ModelConfig:
    base = preset_model_config("baseline")
    if name in PRESET_VARIANTS:
        base = preset_model_config(name)
    elif name in SINGLE_FEATURES:
        base = dataclasses.replace(base, **SINGLE_FEATURES[name])
    elif name not in QAT_VARIANTS:
        raise SystemExit(f"unknown variant {name!r}")
    if tiny:
        # Keep the technique, shrink the shapes (bigram tables and rotated dims shrink to fit).
        changes = dict(TINY, bigram_buckets=min(base.bigram_buckets, 97), bigram_dim=min(base.bigram_dim, 16))
        changes["rope_dims"] = min(base.rope_dims, 8)
        changes["attn_out_gate_width"] = min(base.attn_out_gate_width, 8)
        base = dataclasses.replace(base, **changes)
    return base


def place(model: GPT, device: torch.device) -> GPT:
    """As `pgolf train` places it on CUDA: bf16 module, fp32 CastedLinear weights and fp32 control parameters."""
    model = model.to(device)
    return bf16_training_dtypes(model) if device.type == "cuda" else model


def flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (the tied head included) + causal attention scores."""
    config = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, CastedLinear))
    if config.tie_embeddings:
        matmul += model.tok_emb.weight.numel()
    attention = 6 * config.num_layers * config.model_dim * seq_len  # 3 x (QK^T + AV) x 2 FLOPs, half masked
    return 6 * matmul + attention


def measure(name: str, args, device: torch.device) -> dict:
    config = variant_config(name, args.tiny)
    torch.manual_seed(0)
    model = place(GPT(config), device).train()
    if name in QAT_VARIANTS:
        set_qat_plan(model, {layer: 6 for layer in casted_linear_names(model) if layer != "lm_head"})
        set_qat_enabled(model, QAT_VARIANTS[name])
    seq_len = min(args.seq_len, config.max_seq_len)
    compiled = torch.compile(model, dynamic=False, fullgraph=True) if args.compile else model
    generator = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, seq_len + 1)
    tokens = torch.randint(0, config.vocab_size, shape, generator=generator).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = compiled(inputs, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    step_ms = 1000.0 * (time.perf_counter() - started) / args.steps
    tokens_per_step = args.micro_batch * seq_len
    tokens_per_s = tokens_per_step / (step_ms / 1000.0)
    result = {
        "variant": name,
        "params": sum(p.numel() for p in model.parameters()),
        "micro_batch": args.micro_batch,
        "seq_len": seq_len,
        "compile": args.compile,
        "warmup_s": round(warmup_s, 2),
        "ms_per_step": round(step_ms, 3),
        "tokens_per_s": round(tokens_per_s),
        "mfu": round(flops_per_token(model, seq_len) * tokens_per_s / (args.peak_tflops * 1e12), 4),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    variants = [*PRESET_VARIANTS, *SINGLE_FEATURES, *QAT_VARIANTS]
    parser.add_argument("--variants", nargs="+", default=variants, help=f"any of: {' '.join(variants)}")
    parser.add_argument("--micro-batch", type=int, default=64, help="sequences per step (challenge: 64/GPU)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak (H100/H200 SXM)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = []
    for name in args.variants:
        result = measure(name, args, device)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
        torch._dynamo.reset()
    reference = results[0]["ms_per_step"]
    header = f"{'variant':<20} {'params':>11} {'ms/step':>9} {'x first':>8} {'tok/s':>11} {'MFU':>6}"
    print(header, file=sys.stderr)
    for r in results:
        ratio = r["ms_per_step"] / reference
        print(f"{r['variant']:<20} {r['params']:>11,} {r['ms_per_step']:>9.2f} {ratio:>8.3f}"
              f" {r['tokens_per_s']:>11,} {r['mfu']:>6.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
