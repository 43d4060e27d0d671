"""The n-gram cache and score-first TTT: the mixer's own cost, and val_bpb / eval time of each on an artifact.

    python benchmarks/ngram_ttt.py mixer                                   # V 1024 and 8192, orders 3/5/7
    python benchmarks/ngram_ttt.py mixer --vocab 8192 --orders 7 --buckets 16384,65536 --targets 4000000
    python benchmarks/ngram_ttt.py eval artifacts/run1/blob --data artifacts/bench1024 --stride 64 \\
        --orders 2,3,5,7 --alphas 0.2,0.4,0.6 --ttt sgd,lora,phased --val-tokens 1000000
    python benchmarks/ngram_ttt.py eval /tmp/train --data /tmp/data --device cpu --val-tokens 3000 \\
        --orders 3,5 --ttt sgd,lora --ttt-set chunk_tokens=512 --ttt-set lora_rank=8   # CPU smoke run

mixer: NgramMixer.mix + update on `--chunk` targets at a time (what a sliding-window batch hands the cache:
stride 64 x 32 windows = 2,048), model log-probabilities from random logits so only the cache is timed. One
JSON line per (vocab, order, buckets): ms per chunk for mix and update, targets/s, the count tables' GiB, the
peak CUDA memory, and the projected seconds for the challenge's full val split (62,021,632 tokens at sp1024,
40,540,160 at sp8192). Tokens are random unless --data names shards (their val split is then used).

eval: one pass of the plain model, then one pass with the n-gram grid (--orders x --alphas, fixed; plus
--entropy-alphas with alpha_mode entropy) through pgolf.scoring.score_stream as `pgolf eval` runs it, then
one pass per --ttt mode (score-first TTT, model only). One JSON line per variant: val_bpb, delta_bpb against
the plain model, eval_seconds and its ratio to the plain pass, targets/s, and for TTT the train/score seconds
and steps. Warm-up uses random tokens, never validation tokens.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch

from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.config import resolve
from pgolf.model import build_model
from pgolf.ngram import NgramConfig, NgramMixer
from pgolf.scoring import EvalModel, EvalPlan, ngram_name, score_stream, warm_up
from pgolf.shards import load_split, open_dataset
from pgolf.stage_model import load_stage_model
from pgolf.ttt import TTTConfig

FULL_VAL_TOKENS = {1024: 62_021_632, 8192: 40_540_160}  # REFERENCE.md


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, "torch": torch.__version__}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


def val_tokens(data, limit: int) -> np.ndarray:
    tokens = load_split(open_dataset(data).val)
    return tokens[:limit] if limit else tokens


def bench_mixer(vocab: int, order: int, buckets: int, tokens: torch.Tensor, chunk: int, device) -> dict:
    config = NgramConfig(order=order, alpha=0.4, buckets=buckets)
    generator = torch.Generator(device="cpu").manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(chunk, vocab, generator=generator), dim=-1).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = NgramMixer(config, vocab, device)  # first-call costs on random tokens
    random_tokens = torch.randint(0, vocab, (4 * chunk + 1,), generator=generator).to(device)
    for start in range(1, len(random_tokens) - chunk, chunk):
        warm.mix(random_tokens, torch.arange(start, start + chunk, device=device), logprobs)
        warm.update(random_tokens, start + chunk)
    del warm
    mixer = NgramMixer(config, vocab, device)
    mix_seconds = update_seconds = 0.0
    targets = 0
    for start in range(1, len(tokens) - chunk + 1, chunk):
        positions = torch.arange(start, start + chunk, device=device)
        synchronize(device)
        began = time.perf_counter()
        mixer.mix(tokens, positions, logprobs)
        synchronize(device)
        middle = time.perf_counter()
        mixer.update(tokens, start + chunk)
        synchronize(device)
        mix_seconds += middle - began
        update_seconds += time.perf_counter() - middle
        targets += chunk
    chunks = max(targets // chunk, 1)
    per_target = (mix_seconds + update_seconds) / max(targets, 1)
    row = {
        "bench": "mixer", "vocab": vocab, "order": order, "buckets": buckets, "chunk": chunk,
        "targets": targets,
        "mix_ms": 1e3 * mix_seconds / chunks, "update_ms": 1e3 * update_seconds / chunks,
        "targets_per_second": 1.0 / per_target if per_target else None,
        "table_gib": config.table_bytes(vocab) / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        **environment(device),
    }
    if vocab in FULL_VAL_TOKENS:
        row["projected_full_val_seconds"] = FULL_VAL_TOKENS[vocab] * per_target
    return row


def run_mixer(args) -> None:
    device = torch.device(args.device)
    real = val_tokens(args.data, args.targets + 1) if args.data else None
    for vocab in ints(args.vocab):
        if real is not None and int(real.max()) >= vocab:
            log(f"skipping vocab {vocab}: the --data tokens go up to {int(real.max())}")
            continue
        if real is not None:
            tokens = torch.from_numpy(real.astype(np.int64)).to(device)
        else:
            generator = torch.Generator(device="cpu").manual_seed(1)
            tokens = torch.randint(0, vocab, (args.targets + 1,), generator=generator).to(device)
        for order in ints(args.orders):
            for buckets in ints(args.buckets):
                row = bench_mixer(vocab, order, buckets, tokens, args.chunk, device)
                print(json.dumps(row), flush=True)
                log(f"V={vocab} order={order} buckets={buckets}: mix {row['mix_ms']:.2f} ms + update "
                    f"{row['update_ms']:.2f} ms per {args.chunk} targets, {row['targets_per_second']:,.0f} "
                    f"targets/s, tables {row['table_gib']:.2f} GiB")


def eval_row(name: str, passed, totals_name: str, base, env: dict) -> dict:
    totals = passed.totals[totals_name]
    row = {"bench": "eval", "variant": name, "val_loss": totals.val_loss, "val_bpb": totals.val_bpb,
           "targets": totals.targets, "eval_seconds": passed.eval_seconds,
           "targets_per_second": totals.targets / max(passed.eval_seconds, 1e-9), **env}
    if base is not None:
        row["delta_bpb"] = totals.val_bpb - base["val_bpb"]
        row["eval_seconds_ratio"] = passed.eval_seconds / max(base["eval_seconds"], 1e-9)
    return row


def run_evals(args) -> None:
    device = torch.device(args.device)
    dataset = open_dataset(args.data)
    state, config, _ = load_stage_model(args.artifact, dataset.tokenizer)
    tokens = val_tokens(args.data, args.val_tokens).astype(np.int64)
    tables = build_byte_tables(load_tokenizer(dataset.tokenizer), config.vocab_size)
    seq_len = args.seq_len or config.max_seq_len
    plan = EvalPlan(seq_len, args.stride or seq_len, False, args.batch_seqs)
    model = EvalModel(build_model(state, config, device), compile=device.type == "cuda")
    warm_up(model, config.vocab_size, plan.seq_len, plan.batch_seqs, device)
    env = {**environment(device), "seq_len": plan.seq_len, "stride": plan.stride}
    log(f"{args.artifact}: {len(tokens):,} val tokens, seq_len {plan.seq_len}, stride {plan.stride}, "
        f"{device}")

    plain = score_stream(model, tokens, plan, tables, device)
    base = eval_row("model", plain, "model", None, env)
    print(json.dumps(base), flush=True)
    log(f"model: val_bpb {base['val_bpb']:.5f}, {base['eval_seconds']:.1f} s")

    grid = [NgramConfig(order, alpha, "fixed", args.buckets) for order in ints(args.orders)
            for alpha in floats(args.alphas)]
    grid += [NgramConfig(order, alpha, "entropy", args.buckets) for order in ints(args.orders)
             for alpha in floats(args.entropy_alphas)]
    if grid:
        swept = score_stream(model, tokens, plan, tables, device, ngram=grid)
        for point in grid:
            row = eval_row(ngram_name(point), swept, ngram_name(point), base, env)
            row["grid_points"] = len(grid)  # eval_seconds is the whole grid's single pass
            print(json.dumps(row), flush=True)
            log(f"{row['variant']}: val_bpb {row['val_bpb']:.5f} ({row['delta_bpb']:+.5f})")
        log(f"n-gram grid of {len(grid)}: {swept.eval_seconds:.1f} s for the pass")

    settings = dict(part.split("=", 1) for part in args.ttt_set)
    for mode in [m for m in args.ttt.split(",") if m]:
        ttt_config, _ = resolve(TTTConfig, kind="ttt", env={}, overrides={**settings, "mode": mode})
        adapted = score_stream(model, tokens, plan, tables, device, ttt_config=ttt_config)
        row = eval_row(f"ttt-{mode}", adapted, "model", base, env)
        result = adapted.ttt
        row.update(ttt_train_seconds=result.train_seconds, ttt_score_seconds=result.score_seconds,
                   ttt_steps=result.steps, ttt_config=ttt_config.__dict__)
        print(json.dumps(row), flush=True)
        log(f"ttt {mode}: val_bpb {row['val_bpb']:.5f} ({row['delta_bpb']:+.5f}), "
            f"{row['eval_seconds']:.1f} s ({result.train_seconds:.1f} s training, {result.steps} steps)")


def parse_args(argv: list[str]):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    commands = parser.add_subparsers(dest="command", required=True)
    mixer = commands.add_parser("mixer", help="NgramMixer alone: mix + update cost per chunk of targets")
    mixer.add_argument("--vocab", default="1024,8192", help="vocabulary sizes")
    mixer.add_argument("--orders", default="3,5,7", help="n-gram orders")
    mixer.add_argument("--buckets", default="65536", help="context rows per order")
    mixer.add_argument("--targets", type=int, default=2_000_000, help="targets timed per configuration")
    mixer.add_argument("--chunk", type=int, default=2048, help="targets per mix/update call")
    mixer.add_argument("--data", help="shard directory whose val tokens replace the random ones")
    mixer.add_argument("--device", default=default_device)
    evals = commands.add_parser("eval", help="val_bpb and eval time of the n-gram grid and TTT modes")
    evals.add_argument("artifact", help="a train, quantize or compress output directory")
    evals.add_argument("--data", required=True, help="shard directory with val shards and the tokenizer")
    evals.add_argument("--seq-len", type=int, default=0, help="window length (0: the model's max_seq_len)")
    evals.add_argument("--stride", type=int, default=64, help="sliding stride (0: flat windows)")
    evals.add_argument("--batch-seqs", type=int, default=32, help="windows per forward pass")
    evals.add_argument("--val-tokens", type=int, default=0, help="score only the first N val tokens (0: all)")
    evals.add_argument("--orders", default="2,3,5,7", help="n-gram orders of the grid ('' for none)")
    evals.add_argument("--alphas", default="0.2,0.4", help="fixed alphas of the grid")
    evals.add_argument("--entropy-alphas", default="0.6", help="entropy-mode ceilings of the grid")
    evals.add_argument("--buckets", type=int, default=65536, help="context rows per order")
    evals.add_argument("--ttt", default="sgd,lora,phased", help="TTT modes, one pass each ('' for none)")
    evals.add_argument("--ttt-set", action="append", default=[], metavar="KEY=VALUE",
                       help="a TTTConfig setting for every mode, e.g. chunk_tokens=2048 (repeatable)")
    evals.add_argument("--device", default=default_device)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.command == "mixer":
        run_mixer(args)
    else:
        run_evals(args)


if __name__ == "__main__":
    main(sys.argv[1:])
