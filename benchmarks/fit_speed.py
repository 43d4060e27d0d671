"""Wall time of the center-out fit (`pgolf quantize --plan center-out-int5 --target-bytes ...`) with the sizings run
one at a time and on parallel threads, in one run on one checkpoint: the same plan must come out of both.

    python benchmarks/fit_speed.py artifacts/run1/train

A checkpoint one training step old is enough to time it (an untrained state is half zeros, as the output
projections start at zero, and fits without demotion) and needs no GPU:
    PGOLF_WARMUP_STEPS=0 pgolf train artifacts/sp1024 --preset seed-11l --iterations 1 --batch-tokens 2048 \
        --compile off --out artifacts/seed-1step
It compresses worse than a trained model, so it demotes more blocks; the timing of one sizing (a zstd-22
compression of the whole model) is what this measures. Each mode gets a fresh quantizer and sizer, so neither
reuses the other's cached work. One JSON line per mode.
"""

import argparse
import dataclasses
import json
import time

from pgolf.artifacts import open_stage
from pgolf.checkpoint import load_checkpoint
from pgolf.codecs import parallel_workers
from pgolf.fit import ArtifactSizer, fit_plan_to_target
from pgolf.model import block_layout
from pgolf.plans import PlanQuantizer, assign_schemes, demotable_blocks, load_plan, quantized_plan
from pgolf.stage_model import TRAIN_WEIGHTS, train_checkpoint


def fit(state, model_config, args, workers: int) -> dict:
    spec = load_plan("center-out-int5")
    schemes = assign_schemes(spec, state)
    quantizer = PlanQuantizer(state, clip=spec.clip, scale_floor=spec.scale_floor)
    sizer = ArtifactSizer(args.codec, args.code_bytes)
    sizings = []

    def size_of(assignment: dict) -> int:
        sizings.append(1)
        tensors, records = quantizer.quantize(assignment)
        plan = quantized_plan(dataclasses.asdict(model_config), {}, spec, spec.clip, records)
        return sizer(tensors, json.loads(json.dumps(plan)))

    layout = block_layout(model_config)
    blocks = demotable_blocks(schemes, layout)
    order = [block for block in layout.center_out() if block in blocks]
    started = time.perf_counter()
    _, steps = fit_plan_to_target(schemes, order, spec.demote_to, size_of, args.target_bytes, layout,
                                  workers=workers)
    return {"workers": workers, "seconds": round(time.perf_counter() - started, 1), "sizings": len(sizings),
            "demoted": steps[-1]["demoted"], "bytes": steps[-1]["bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_dir", help="a `pgolf train` output directory (its exported weights are fitted)")
    parser.add_argument("--target-bytes", type=int, default=16_000_000)
    parser.add_argument("--code-bytes", type=int, default=60_000)
    parser.add_argument("--codec", default="zstd")
    args = parser.parse_args()
    path = train_checkpoint(open_stage(args.train_dir, "train"), args.train_dir, TRAIN_WEIGHTS[0])
    state, model_config, _ = load_checkpoint(path)
    parallel = parallel_workers(model_config.num_layers + 1)
    results = [fit(state, model_config, args, workers) for workers in (1, parallel)]
    for result in results:
        print(json.dumps(result), flush=True)
    if results[0]["demoted"] != results[1]["demoted"]:
        raise SystemExit("the parallel fit chose another plan than the serial one")


if __name__ == "__main__":
    main()
