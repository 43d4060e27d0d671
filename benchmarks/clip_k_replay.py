"""Replay a measured clip-k fit with this pgolf's search: how many whole-model sizings (and rounds of them) it would
spend on the same size curve. Each sizing is a brotli-11 compression of the whole quantized model (2 minutes at
SP8192 scale), so a round saved is minutes of an export.

    python benchmarks/clip_k_replay.py artifacts/r300/q.json --integer-values 35919892 --k-max 1.5

The curve is the recorded fit's own sizes (`pgolf quantize --json`'s fit.clip_k_steps), joined piecewise-linearly
in ln k (sizes fall about linearly in ln k); `--integer-values` gives the bytes-per-doubling prior the quantize
stage uses (the plan's integer values / 8: its log line "int6: N tensors, P params" summed over integer schemes).
One JSON line per worker count, plus the recorded fit's own sizings and rounds as the baseline.
"""

import argparse
import json
import math

from pgolf.fit import fit_clip_k


def curve(steps: list[dict]):
    sizes = {step["k_scale"]: step["bytes"] for step in steps}
    ks = sorted(sizes)

    def size_at(factor: float) -> int:
        index = min(max(sum(k <= factor for k in ks) - 1, 0), len(ks) - 2)
        a, b = ks[index], ks[index + 1]
        return int(sizes[a] + (sizes[b] - sizes[a]) * math.log(factor / a) / math.log(b / a))
    return size_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", help="pgolf quantize --json output of a clip-k fit")
    parser.add_argument("--integer-values", type=int, required=True, help="values of the plan's integer tensors")
    parser.add_argument("--k-min", type=float, default=1.0)
    parser.add_argument("--k-max", type=float, default=1.5)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    result = json.load(open(args.result))
    steps, target = result["fit"]["clip_k_steps"], result["target_bytes"]
    size_at = curve(steps)
    print(json.dumps({"recorded": {"sizings": len(steps), "k_scale": result["fit"]["k_scale"]}}))
    for workers in args.workers:
        rounds: list[int] = []
        factor, replayed, fits = fit_clip_k(size_at, target, args.k_max, workers=workers, k_min=args.k_min,
                                            bytes_per_doubling=args.integer_values / 8,
                                            prepare=lambda factors, rounds=rounds: rounds.append(len(factors)))
        print(json.dumps({"workers": workers, "sizings": len(replayed), "rounds": rounds,
                          "k_scale": round(factor, 6), "bytes": size_at(factor), "fits": fits}))


if __name__ == "__main__":
    main()
