"""Document-isolated training attention (TrainConfig.isolate_documents) against dense causal attention: forward +
backward ms per micro-batch of a record-0416-sized model (bf16 autocast, torch.compile fullgraph, the trainer's
dtype placement and CUDA settings), for each way pgolf.model can isolate documents, then the attention op alone
with torch's varlen (packed-sequence flash) kernel as one more candidate.

    python benchmarks/doc_attention.py --data artifacts/bench-data --steps 20 --out doc_attention.jsonl
    python benchmarks/doc_attention.py --steps 20 --out doc_attention.jsonl     # synthetic document lengths
    python benchmarks/doc_attention.py --candidates causal flex --no-kernels    # a subset (compile is slow)
    python benchmarks/doc_attention.py --tiny --compile off --steps 2 --out /tmp/d.jsonl  # CPU smoke run

Micro-batches are 48 x 2048 tokens (the 04-16 record's per-GPU micro-batch) cut from the train stream of --data
(a `pgolf tokenize` output: BOS = 1 before each document), as the trainer reads it, so the document lengths are
real; segments end at row boundaries, i.e. are capped at seq_len, as in the records. Without --data, documents
are drawn from a lognormal length distribution (sigma 1.0, mean 811 tokens: FineWeb val at sp8192 is 40,540,160
tokens in 50,000 documents) with random token ids.

Model candidates: `causal` (isolate_documents off: SDPA's flash kernel, the baseline), then isolate_documents on
with GPT.document_attention forced to `sdpa_mask` (SDPA with a dense [B, 1, T, T] mask; the trainer's fast-math
settings leave SDPA only its flash and math kernels, so this candidate also enables the memory-efficient kernel,
the only one that takes a mask at this size), `flex` (flex_attention with a document BlockMask built inside the
compiled graph) and `flex-prebuilt` (the same BlockMask built eagerly before each step and passed in as an input of
the compiled model: create_block_mask is then not traced into the model's graph). What `auto` resolves to under
torch.compile on this device is printed too. Each candidate builds a fresh model (same seed), compiles it, runs
--warmup untimed steps, then --steps timed steps over a few distinct batches; a candidate that fails (no kernel,
out of memory, a compile error) is reported and skipped.

MFU = (6 x matmul weights a token passes through, a looped block counted once per run and the tied head included,
+ causal attention 6 x block runs x model_dim x seq_len) x tokens / time / peak (989.4e12: H100 and H200 SXM dense
bf16). The attention term is the causal one for every candidate, so MFU compares like with like; isolation does
less attention work (`attention_work_ratio`: its share of causal's score entries in these batches).

Output: a table on stdout, then one JSON line (also appended to --out).
"""

import argparse
import dataclasses
import gc
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from train_step import flops_per_token  # benchmarks/ is sys.path[0] when run as a script

from pgolf.dist import configure_cuda
from pgolf.model import (
    BOS_ID,
    GPT,
    ModelConfig,
    attend,
    document_attention_kind,
    document_mask,
    flex_attention_api,
)
from pgolf.shards import list_shards
from pgolf.train_loader import TokenStream
from pgolf.trainer import place_model

RECORD_0416 = ModelConfig(
    vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
    activation="leaky_relu2", leaky_slope=0.5, tie_embeddings=True, rope_dims=16, xsa_last_n=-1, ln_scale=True,
    num_loops=2, loop_start=3, loop_end=5, parallel_start_layer=8, skip_gates=True, smear_gate_width=12,
    attn_out_gate_width=12, qk_gain_init=5.0, bos_isolation=False, max_seq_len=2048)
# --tiny: the same techniques in small shapes (loop 1..2 twice more, lanes from block 3), for a CPU smoke run.
TINY_CHANGES = dict(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, loop_start=1, loop_end=2,
                    parallel_start_layer=3)
MODEL_CANDIDATES = ("causal", "sdpa_mask", "flex", "flex-prebuilt")
KERNEL_CANDIDATES = ("causal", "sdpa_mask", "flex", "varlen")
SYNTHETIC_MEAN_DOC_TOKENS = 40_540_160 / 50_000  # FineWeb val at sp8192: tokens / documents (BOS included)
SYNTHETIC_SIGMA = 1.0  # lognormal spread of document lengths
DISTINCT_BATCHES = 4  # timed steps cycle through this many micro-batches (new document boundaries each step)


# ---- data ------------------------------------------------------------------------------------------------------


def stream_tokens(data: str | None, count: int, vocab_size: int) -> tuple[np.ndarray, str]:
    """`count` tokens from the start of --data's train stream (the trainer's order), or synthetic documents."""
    if data:
        paths = list_shards(Path(data), "train")
        if not paths:
            raise SystemExit(f"{data}: no fineweb_train_*.bin shards")
        tokens = TokenStream(paths, vocab_size).take(count).astype(np.int64)
        return tokens, str(data)
    rng = np.random.default_rng(0)
    median = SYNTHETIC_MEAN_DOC_TOKENS / np.exp(SYNTHETIC_SIGMA**2 / 2)
    pieces, total = [], 0
    while total < count:
        length = max(2, int(rng.lognormal(np.log(median), SYNTHETIC_SIGMA)))
        pieces.append(np.concatenate(([BOS_ID], rng.integers(2, vocab_size, length - 1))))
        total += length
    return np.concatenate(pieces)[:count], f"synthetic lognormal (mean {SYNTHETIC_MEAN_DOC_TOKENS:.0f} tokens)"


def make_batches(tokens: np.ndarray, batch: int, seq_len: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) [batch, seq_len] micro-batches from consecutive spans of batch * seq_len + 1 tokens, as TrainLoader."""
    span = batch * seq_len + 1
    batches = []
    for index in range(len(tokens) // span):
        chunk = torch.from_numpy(tokens[index * span : (index + 1) * span])
        x, y = chunk[:-1].view(batch, seq_len), chunk[1:].view(batch, seq_len)
        batches.append((x.to(device), y.to(device)))
    return batches


def segment_lengths(x: torch.Tensor) -> list[int]:
    """Lengths of the isolated segments of a batch: each row split before every BOS."""
    lengths = []
    for row in x.cpu().numpy():
        starts = np.flatnonzero(row == BOS_ID)
        starts = np.union1d(starts, [0])
        lengths += np.diff(np.append(starts, len(row))).tolist()
    return lengths


def document_stats(batches, seq_len: int) -> dict:
    lengths = [n for x, _ in batches for n in segment_lengths(x)]
    rows = sum(x.size(0) for x, _ in batches)
    isolated = sum(n * (n + 1) // 2 for n in lengths)
    return {"segments": len(lengths), "mean_segment_tokens": round(float(np.mean(lengths)), 1),
            "median_segment_tokens": float(np.median(lengths)),
            "attention_work_ratio": round(isolated / (rows * seq_len * (seq_len + 1) / 2), 4)}


# ---- measuring -------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def use_sdpa_mask_kernels(device: torch.device, on: bool) -> None:
    """The trainer's fast-math settings (flash only; a mask needs the memory-efficient kernel) plus, for the
    dense-mask candidate, the memory-efficient kernel."""
    if device.type == "cuda":
        configure_cuda()
        torch.backends.cuda.enable_mem_efficient_sdp(on)


def timed(step, warmup: int, steps: int, device: torch.device) -> dict:
    """Run `step(i)` warmup times untimed (compilation happens here), then `steps` times timed."""
    started = time.perf_counter()
    for index in range(warmup):
        step(index)
    synchronize(device)
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for index in range(steps):
        step(warmup + index)
    synchronize(device)
    result = {"warmup_s": round(warmup_s, 2), "ms_per_step": round(1000.0 * (time.perf_counter() - started) / steps, 3)}
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def measure_model(candidate: str, config: ModelConfig, batches, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = place_model(GPT(config), device).train()
    isolate = candidate != "causal"
    prebuilt = candidate == "flex-prebuilt"
    if isolate:
        model.document_attention = "flex" if prebuilt else candidate
    use_sdpa_mask_kernels(device, candidate == "sdpa_mask")
    compiled = model if args.compile == "off" else torch.compile(model, backend=args.compile, fullgraph=True,
                                                                 dynamic=False)
    first_loss = []

    def step(index: int) -> None:
        x, y = batches[index % len(batches)]
        mask = document_mask(x, "flex") if prebuilt else None  # eager, outside the compiled graph; timed
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = compiled(x, y, isolate_documents=isolate, mask=mask)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if index == 0:
            first_loss.append(loss.detach())

    result = timed(step, args.warmup, args.steps, device)
    tokens_per_step = batches[0][0].numel()
    tokens_per_s = tokens_per_step / (result["ms_per_step"] / 1000.0)
    result |= {"tokens_per_s": round(tokens_per_s),
               "mfu": round(flops_per_token(model, config.max_seq_len) * tokens_per_s / (args.peak_tflops * 1e12), 4),
               "loss_first_batch": round(first_loss[0].item(), 5)}
    return result


def varlen_attention():
    """(q, k, v, cu_seqlens, max_len) -> output on packed [tokens, heads, head_dim] tensors: torch's flash varlen
    kernel (torch.nn.attention.varlen, newer torch only; its keyword arguments changed between releases)."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}

    def run(q, k, v, cu_seqlens, max_len):
        options = dict(causal)
        if "enable_gqa" in parameters and q.size(1) != k.size(1):
            options["enable_gqa"] = True
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options)

    return run


def kernel_inputs(config: ModelConfig, x: torch.Tensor, device: torch.device):
    batch, seq_len = x.shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)

    def random(heads):
        return torch.randn(batch, heads, seq_len, config.head_dim, device=device, dtype=dtype, generator=generator)

    return random(config.num_heads), random(config.num_kv_heads), random(config.num_kv_heads)


def measure_kernel(candidate: str, config: ModelConfig, x: torch.Tensor, reference, args, device) -> dict:
    """Forward + backward of the attention op alone on one micro-batch's document boundaries; the mask (or the
    packed boundaries) is built once, outside the timing, and its build time reported as mask_ms."""
    q, k, v = kernel_inputs(config, x, device)
    batch, heads, seq_len, head_dim = q.shape
    use_sdpa_mask_kernels(device, candidate == "sdpa_mask")
    started = time.perf_counter()
    if candidate == "causal":
        inputs, run = (q, k, v), lambda q, k, v: attend(q, k, v)
    elif candidate in ("sdpa_mask", "flex"):
        mask = document_mask(x, candidate)
        inputs = (q, k, v)
        if candidate == "flex":
            api = flex_attention_api()
            flex = api[1] if args.compile == "off" else torch.compile(api[1], backend=args.compile, dynamic=False)
            group = config.num_heads // config.num_kv_heads

            def run(q, k, v):
                return flex(q, k, v, block_mask=mask, enable_gqa=group > 1)
        else:
            def run(q, k, v):
                return attend(q, k, v, mask)
    else:
        starts = sorted({row * seq_len + col for row in range(batch) for col in [0, *torch.nonzero(
            x[row] == BOS_ID).flatten().tolist()]})
        bounds = starts + [batch * seq_len]
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        max_len = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        varlen = varlen_attention()
        inputs = tuple(t.transpose(1, 2).reshape(batch * seq_len, t.size(1), head_dim).contiguous() for t in (q, k, v))

        def run(q, k, v):
            return varlen(q, k, v, cu_seqlens, max_len)
    synchronize(device)
    mask_ms = 1000.0 * (time.perf_counter() - started)
    inputs = [t.detach().requires_grad_() for t in inputs]
    grad_out = torch.ones_like(inputs[0])
    outputs = []

    def step(index: int) -> None:
        out = run(*inputs)
        out.backward(grad_out)
        for t in inputs:
            t.grad = None
        if index == 0:
            outputs.append(out.detach())

    result = timed(step, args.warmup, args.steps * 5, device) | {"mask_ms": round(mask_ms, 2)}
    out = outputs[0]
    if candidate == "varlen":
        out = out.view(batch, seq_len, heads, head_dim).transpose(1, 2)
    if reference is not None and candidate != "causal":
        result["max_abs_diff_vs_sdpa_mask"] = float(f"{(out.float() - reference.float()).abs().max().item():.3g}")
    return result


def run_candidates(names, measure, label: str, device: torch.device) -> dict:
    results = {}
    for name in names:
        try:
            results[name] = measure(name)
        except Exception as error:  # one failing candidate must not stop the others
            lines = str(error).strip().splitlines()
            message = f"{type(error).__name__}: {lines[0] if lines else ''}"[:400]
            print(f"{label} {name}: FAILED {message}", file=sys.stderr, flush=True)
            results[name] = {"error": message}
        release(device)  # compiled graphs and cached blocks (also after an out-of-memory error)
        row = results[name]
        if "ms_per_step" in row:
            print(f"{label} {name}: {row['ms_per_step']:.2f} ms/step", flush=True)
    return results


def add_ratios(results: dict) -> None:
    base = results.get("causal", {}).get("ms_per_step")
    for row in results.values():
        if base and "ms_per_step" in row:
            row["ratio_to_causal"] = round(row["ms_per_step"] / base, 3)


def auto_choice(device: torch.device) -> str:
    """What document_attention="auto" resolves to inside torch.compile on this device."""

    @torch.compile(backend="eager", fullgraph=True)
    def probe(x):
        return x + (1 if document_attention_kind(x.device) == "flex" else 0)

    return "flex" if probe(torch.zeros((), device=device)).item() == 1 else "sdpa_mask"


def print_table(title: str, results: dict, with_mfu: bool) -> None:
    print(title)
    for name, row in results.items():
        if "error" in row:
            print(f"  {name:<10} failed: {row['error'][:100]}")
            continue
        ratio = f"{row['ratio_to_causal']:.3f}x causal" if "ratio_to_causal" in row else ""
        extra = f"  MFU {row['mfu']:.3f}  loss {row['loss_first_batch']:.4f}" if with_mfu else \
            f"  mask {row['mask_ms']:.1f} ms  diff {row.get('max_abs_diff_vs_sdpa_mask', '-')}"
        memory = f"  peak {row['peak_mem_gib']} GiB" if "peak_mem_gib" in row else ""
        print(f"  {name:<10} {row['ms_per_step']:9.2f} ms/step  {ratio:>14}{extra}{memory}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--data", help="`pgolf tokenize` output dir (its train shards); default synthetic documents")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per candidate (x5 for the kernels)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--batch", type=int, default=48, help="sequences per micro-batch (04-16 record: 48)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--candidates", nargs="+", default=list(MODEL_CANDIDATES), choices=MODEL_CANDIDATES)
    parser.add_argument("--kernels", nargs="+", default=list(KERNEL_CANDIDATES), choices=KERNEL_CANDIDATES)
    parser.add_argument("--no-kernels", dest="kernels", action="store_const", const=[])
    parser.add_argument("--compile", default="inductor", choices=("inductor", "aot_eager", "off"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small model and shapes, for a CPU smoke run")
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak (H100/H200 SXM)")
    parser.add_argument("--out", help="append the JSON line to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.batch, args.seq_len = min(args.batch, 4), min(args.seq_len, 64)
    config = dataclasses.replace(RECORD_0416, **(TINY_CHANGES if args.tiny else {}), max_seq_len=args.seq_len)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type != "cuda" and not args.tiny:
        print("no CUDA: these timings say nothing about the GPU", file=sys.stderr)

    tokens, source = stream_tokens(args.data, DISTINCT_BATCHES * (args.batch * args.seq_len + 1), config.vocab_size)
    batches = make_batches(tokens, args.batch, args.seq_len, device)
    stats = document_stats(batches, args.seq_len)
    auto = auto_choice(device)
    print(f"{card}, torch {torch.__version__}, compile {args.compile}; {args.batch} x {args.seq_len} tokens per "
          f"micro-batch from {source}: {stats}; auto -> {auto}", flush=True)

    models = run_candidates(args.candidates, lambda name: measure_model(name, config, batches, args, device), "model",
                            device)
    add_ratios(models)
    kernels = {}
    if args.kernels:
        x = batches[0][0]
        q, k, v = kernel_inputs(config, x, device)
        use_sdpa_mask_kernels(device, True)
        with torch.no_grad():
            reference = attend(q, k, v, document_mask(x, "sdpa_mask"))
        del q, k, v
        kernels = run_candidates(args.kernels, lambda name: measure_kernel(name, config, x, reference, args,
                                                                           device), "kernel", device)
        add_ratios(kernels)

    with torch.device("meta"):
        model = GPT(config, init_weights=False)
    result = {
        "benchmark": "doc_attention", "device": card, "torch": torch.__version__, "compile": args.compile,
        "tiny": args.tiny, "batch": args.batch, "seq_len": args.seq_len, "data": source, "documents": stats,
        "auto_choice": auto, "params": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(model, args.seq_len), "peak_tflops": args.peak_tflops,
        "warmup": args.warmup, "steps": args.steps, "model": models, "kernels": kernels,
    }
    print_table("model forward + backward (bf16 autocast on CUDA):", models, with_mfu=True)
    if kernels:
        print_table(f"attention op alone, forward + backward, {args.steps * 5} steps:", kernels, with_mfu=False)
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
