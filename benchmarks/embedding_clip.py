"""The tied token embedding quantized by GPTQ (Hessian of the final hidden states: its head role only, as the records
do) against round-to-nearest with the same clip, everything else equal: val loss of the float model, of the plan's
export, and of that export with the other method's embedding swapped in.

    python -m pgolf train DATA --config run.toml --out T --gptq-calibration-batches 8 --gptq-reserve-seconds 10
    python benchmarks/embedding_clip.py T DATA                      (plan record-int6: int7 embedding, sdclip k 15)

One JSON line: val loss (nats) of float, gptq, rtn, gptq with rtn's embedding, and the val tokens scored.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pgolf.checkpoint import load_checkpoint
from pgolf.model import build_model
from pgolf.quantized import dequantize_state, load_quantized
from pgolf.shards import list_shards, load_split

CLIPS = {"gptq": "gptq-sdclip", "rtn": "sdclip"}


@torch.no_grad()
def val_loss(state: dict, config, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 64) -> float:
    model = build_model(state, config, "cpu").eval()
    losses = [model(inputs[i:i + batch], targets[i:i + batch]).item() for i in range(0, len(inputs), batch)]
    return float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("train", type=Path, help="a `pgolf train` output (with its saved GPTQ Hessians)")
    parser.add_argument("data", type=Path, help="the tokenized data it trained on (val split scored)")
    parser.add_argument("--plan", default="record-int6", help="the export plan (its clip is replaced per run)")
    parser.add_argument("--val-tokens", type=int, default=400_000)
    args = parser.parse_args()
    reference, config, _ = load_checkpoint(args.train / "model.safetensors")
    tokens = torch.from_numpy(np.asarray(load_split(list_shards(args.data, "val")), dtype=np.int64))
    seq = config.max_seq_len
    count = min(len(tokens) - 1, args.val_tokens) // seq * seq
    inputs, targets = tokens[:count].view(-1, seq), tokens[1:count + 1].view(-1, seq)
    states = {}
    with tempfile.TemporaryDirectory() as work:
        for name, clip in CLIPS.items():
            subprocess.run([sys.executable, "-m", "pgolf", "quantize", str(args.train), "--plan", args.plan,
                            "--clip", clip, "--device", "cpu", "--out", f"{work}/{name}"], check=True,
                           stdout=subprocess.DEVNULL)
            states[name] = dequantize_state(*load_quantized(Path(work) / name))
    swapped = {**states["gptq"], "tok_emb.weight": states["rtn"]["tok_emb.weight"]}
    result = {"float": val_loss(reference, config, inputs, targets),
              **{name: val_loss(state, config, inputs, targets) for name, state in states.items()},
              "gptq_with_rtn_embedding": val_loss(swapped, config, inputs, targets), "val_tokens": count,
              "plan": args.plan}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
