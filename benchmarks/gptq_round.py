"""GPTQ time of one clip-k fit round: the fit sizes several sdclip k factors at once, and each needs every
matrix quantized by GPTQ at its own scales. Two ways, in one run on the same weights and Hessians:

    threads   each factor's PlanQuantizer.quantize on its own thread (the fit's sizing threads before
              PlanQuantizer.prefetch: a Python loop per GPTQ column, the threads taking turns at the GIL)
    stacked   PlanQuantizer.prefetch: one GPTQ solve per matrix with its rows stacked once per factor

    python benchmarks/gptq_round.py --preset seed-11l-300s --factors 8 --device cuda
    python benchmarks/gptq_round.py --preset tiny --factors 2 --device cpu        # CPU smoke run

The matrices are the preset's int6 plan tensors (`int6-sdclip-fit`'s schemes) with random weights (std 0.02)
and Hessians of random correlated inputs: GPTQ's time depends on the shapes, not the values. The factors span
[0.3, 0.45], a late round's cluster. One JSON line: seconds of each way, their ratio, and the fraction of levels
where the two differ (a rounding tie in the stacked matmuls' summation order may fall the other way).
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from pgolf.config import load_preset
from pgolf.model import GPT, ModelConfig
from pgolf.plans import PlanQuantizer, assign_schemes, load_plan
from pgolf.schemes import SCHEMES


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed-11l-300s", help="a train preset: its model's matrix shapes")
    parser.add_argument("--factors", type=int, default=8, help="k factors in the round (the fit's threads)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    config = ModelConfig(**load_preset("train", args.preset)["model"])
    spec = load_plan("int6-sdclip-fit")
    state = {name: 0.02 * torch.randn(tensor.shape, generator=generator) if tensor.dim() == 2 else tensor
             for name, tensor in GPT(config).state_dict().items()}
    schemes = assign_schemes(spec, state, 1024)  # a tiny model too (the CLI keeps matrices under 65,536 float)
    integer = {name: scheme for name, scheme in schemes.items() if SCHEMES[scheme].integer}
    inputs = {}
    hessians = {}
    for name in integer:
        cols = state[name].reshape(state[name].size(0), -1).size(1)
        if cols not in inputs:
            mixing = torch.randn(64, cols, generator=generator)
            inputs[cols] = torch.randn(4096, 64, generator=generator) @ mixing + torch.randn(4096, cols,
                                                                                             generator=generator)
        hessians[name] = (inputs[cols].T @ inputs[cols] / 4096).to(device)
    factors = [round(0.3 + 0.15 * i / max(args.factors - 1, 1), 6) for i in range(args.factors)]

    def quantizer() -> PlanQuantizer:
        made = PlanQuantizer(state, clip=spec.clip, scale_floor=spec.scale_floor, device=device,
                             embedding_k=spec.embedding_k)
        made.hessians.update(hessians)
        return made

    quantizer().quantize(dict(list(integer.items())[:1]), 1.0)  # warm-up: kernels, allocator
    threaded = quantizer()
    synchronize(device)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(factors)) as pool:
        by_thread = list(pool.map(lambda k: threaded.quantize(integer, k)[0], factors))
    synchronize(device)
    threads_s = time.perf_counter() - started
    stacked = quantizer()
    started = time.perf_counter()
    stacked.prefetch(integer, factors)
    by_stack = [stacked.quantize(integer, k)[0] for k in factors]
    synchronize(device)
    stacked_s = time.perf_counter() - started
    differ = total = 0
    for one, other in zip(by_thread, by_stack, strict=True):
        for name in integer:
            differ += int((one[name] != other[name]).sum())
            total += one[name].numel()
    print(json.dumps({"preset": args.preset, "device": str(device), "tensors": len(integer),
                      "params": sum(state[name].numel() for name in integer), "factors": len(factors),
                      "threads_s": round(threads_s, 2), "stacked_s": round(stacked_s, 2),
                      "speedup": round(threads_s / stacked_s, 2), "levels_differ": differ / total}))


if __name__ == "__main__":
    main()
