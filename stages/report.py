"""`pgolf report RUN...`: several seeds' scores -> mean, std and a one-sided t-test against a reference.

The challenge's bar for a record: beat the previous score by >= 0.005 nats at p < 0.01. Tests run in nats
(val_loss) and in bpb (val_bpb); converting between them uses the runs' own bpb-per-nat ratio (tokens per
byte / ln 2 on the validation set), so a bpb reference needs no separate nats figure. The submission's
`p_value` is the nats test's, the challenge's criterion.
"""

import math
from pathlib import Path

import typer

from pgolf import log
from pgolf.artifacts import StageOutput, atomic_write_json, open_stage, read_manifest
from pgolf.errors import InvalidInput, PgolfError, UsageError
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, report
from pgolf.stats import mean_and_std, one_sample_t_test, welch_t_test

RUN_STAGES = ("eval", "train")
UPSTREAM_DEPTH = 4  # eval -> compress -> quantize -> train
SEED_FIELDS = ("val_loss", "val_bpb", "steps", "ms_per_step", "bytes_model")


def upstream(manifest: dict, stage: str, depth: int = UPSTREAM_DEPTH, seen: set | None = None) -> dict | None:
    """The manifest of the nearest `stage` output this one was made from, following recorded input paths."""
    seen = set() if seen is None else seen
    for parent in dict.fromkeys(Path(record["path"]).parent for record in manifest.get("inputs", [])):
        if parent in seen:
            continue
        seen.add(parent)
        try:
            found = read_manifest(parent)
        except PgolfError:
            continue
        if found["stage"] == stage:
            return found
        if depth > 1 and (deeper := upstream(found, stage, depth - 1, seen)):
            return deeper
    return None


def read_run(directory: Path) -> dict:
    """One run's scores and provenance from an eval (post-quant) or train (pre-quant) output."""
    manifest = open_stage(directory, RUN_STAGES)
    metrics = manifest["metrics"]
    scores = {key: metrics.get(key) for key in ("val_loss", "val_bpb")}
    for key, value in scores.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidInput(f"{directory}: manifest metric {key} is {value!r}, not a positive number")
    train = manifest if manifest["stage"] == "train" else upstream(manifest, "train")
    compress = upstream(manifest, "compress")
    train_metrics = (train or {}).get("metrics", {})
    return {
        "dir": str(directory), "stage": manifest["stage"], **scores,
        "seed": (train or {}).get("config", {}).get("train", {}).get("seed"),
        "steps": train_metrics.get("steps"), "ms_per_step": train_metrics.get("ms_per_step"),
        "bytes_model": (compress or {}).get("metrics", {}).get("bytes"),
    }


def read_runs(directories: list[Path], what: str) -> list[dict]:
    runs = [read_run(Path(d)) for d in directories]
    stages = {run["stage"] for run in runs}
    if len(stages) > 1:
        raise UsageError(f"{what} mix eval (post-quant) and train (pre-quant) outputs; compare like "
                         f"with like")
    return runs


def bpb_per_nat(runs: list[dict]) -> float:
    """val_bpb / val_loss, fixed by the validation set and tokenizer (runs that disagree were scored on
    different tokens)."""
    ratios = [run["val_bpb"] / run["val_loss"] for run in runs]
    if max(ratios) - min(ratios) > 1e-6 * max(ratios):
        log.warn(f"bpb/nats ratios differ between runs ({min(ratios):.6f}..{max(ratios):.6f}): "
                 f"were they scored on the same validation tokens?")
    return sum(ratios) / len(ratios)


def significance(runs, reference_runs, reference_bpb, reference_nats, min_improvement_nats) -> dict:
    """Tests in nats and bpb: Welch against reference runs, else one-sample against a reference value."""
    ratio = bpb_per_nat(runs)
    losses, bpbs = [r["val_loss"] for r in runs], [r["val_bpb"] for r in runs]
    if reference_runs:
        return {
            "nats": welch_t_test(losses, [r["val_loss"] for r in reference_runs], min_improvement_nats),
            "bpb": welch_t_test(bpbs, [r["val_bpb"] for r in reference_runs], min_improvement_nats * ratio),
        }
    if reference_bpb is None and reference_nats is None:
        return {}
    reference_nats = reference_nats if reference_nats is not None else reference_bpb / ratio
    reference_bpb = reference_bpb if reference_bpb is not None else reference_nats * ratio
    return {
        "nats": one_sample_t_test(losses, reference_nats, min_improvement_nats),
        "bpb": one_sample_t_test(bpbs, reference_bpb, min_improvement_nats * ratio),
    }


def submission_fields(runs: list[dict], tests: dict) -> dict:
    """The challenge's submission.json score fields (records/*/submission.json)."""
    loss_mean, loss_std = mean_and_std([r["val_loss"] for r in runs])
    bpb_mean, bpb_std = mean_and_std([r["val_bpb"] for r in runs])
    seed_results = {}
    for run in runs:
        key = str(run["seed"]) if run["seed"] is not None else Path(run["dir"]).name
        seed_results[key] = {k: run[k] for k in SEED_FIELDS}
    return {
        "val_loss": loss_mean, "val_bpb": bpb_mean, "val_loss_std": loss_std, "val_bpb_std": bpb_std,
        "p_value": tests.get("nats", {}).get("p_value"), "n_seeds": len(runs),
        "seeds": [run["seed"] for run in runs], "seed_results": seed_results,
    }


def significance_line(unit: str, test: dict) -> str:
    if test["p_value"] is None:
        return f"{unit}: mean {test['mean']:.6f} vs threshold {test['threshold']:.6f}: p undefined (one run)"
    return (f"{unit}: mean {test['mean']:.6f} vs threshold {test['threshold']:.6f}, {test['test']}: "
            f"t = {test['t']:.3f}, dof = {test['dof']:.2f}, one-sided p = {test['p_value']:.3g}")


def report_runs(
    run_dirs: list[Path] = typer.Argument(..., help="Eval (or train) output directories, one per seed."),
    reference: float = typer.Option(None, "--reference", help="Reference val_bpb to beat (e.g. 1.2244)."),
    reference_nats: float = typer.Option(None, "--reference-nats", help="Reference val_loss (nats) to beat."),
    reference_runs: list[Path] = typer.Option(None, "--reference-runs", help="Reference runs (Welch test)."),
    min_improvement_nats: float = typer.Option(0.005, "--min-improvement-nats", help="Required margin."),
    out: Path = typer.Option(None, "--out", "-o", help="Write submission.json + manifest here."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Mean, std and one-sided t-test (H1: mean < reference - margin) over seeds, in nats and bpb.

    Example: pgolf report artifacts/seed*/eval --reference 1.2244 --out artifacts/report
    """
    if reference_runs and (reference is not None or reference_nats is not None):
        raise UsageError("give either --reference/--reference-nats or --reference-runs, not both")
    if min_improvement_nats < 0:
        raise UsageError(f"--min-improvement-nats must be >= 0, got {min_improvement_nats}")
    runs = read_runs(run_dirs, "RUN_DIRs")
    baseline = read_runs(reference_runs, "--reference-runs") if reference_runs else []
    if baseline and baseline[0]["stage"] != runs[0]["stage"]:
        raise UsageError("--reference-runs must be the same kind of output (eval or train) as the RUN_DIRs")
    tests = significance(runs, baseline, reference, reference_nats, min_improvement_nats)
    fields = submission_fields(runs, tests)
    result = {"submission": fields, "tests": tests, "runs": runs,
              "min_improvement_nats": min_improvement_nats}
    lines = [f"{key}: val_loss {r['val_loss']:.6f}  val_bpb {r['val_bpb']:.6f}"
             for key, r in fields["seed_results"].items()]
    lines.append(f"mean over {len(runs)}: val_loss {fields['val_loss']:.6f}  val_bpb {fields['val_bpb']:.6f}"
                 + (f"  (std {fields['val_loss_std']:.6f} / {fields['val_bpb_std']:.6f})"
                    if fields["val_bpb_std"] is not None else ""))
    lines += [significance_line(unit, test) for unit, test in tests.items()]
    if out is not None:
        config = {"reference": reference, "reference_nats": reference_nats, "min_improvement_nats":
                  min_improvement_nats, "reference_runs": [str(p) for p in reference_runs or []]}
        with StageOutput(out, "report", config=config, force=force) as stage:
            for run in runs + baseline:
                stage.add_input(Path(run["dir"]) / "manifest.json", "run")
            atomic_write_json(stage.add_output("submission.json", "submission"), fields)
            stage.metrics = result
            stage.finalize()
        lines.append(f"{out}/submission.json written")
    report(result, as_json, lines)


def register(app: typer.Typer) -> None:
    app.command("report")(report_runs)
