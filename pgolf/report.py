"""The report stage: several seeds' scores -> mean, std and a one-sided t-test against a reference.

The challenge's bar for a record: beat the previous score by >= 0.005 nats at p < 0.01. Tests run in nats
(val_loss) and in bpb (val_bpb); converting between them uses the runs' own bpb-per-nat ratio (tokens per
byte / ln 2 on the validation set), so a bpb reference needs no separate nats figure. The submission's
`p_value` is the nats test's, the challenge's criterion.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pgolf.artifacts import (
    MANIFEST,
    StageOutput,
    atomic_write_json,
    input_source,
    lineage,
    open_stage,
    output_path,
    output_sha256,
    sha256_json,
    up_to_date,
)
from pgolf.dist import PlainLog
from pgolf.errors import InvalidInput, UsageError
from pgolf.stats import mean_and_std, one_sample_t_test, welch_t_test

RUN_STAGES = ("eval", "train")
SCORE_LIMIT = 1e6  # a val_loss or val_bpb this large is no score (a softcapped model stays far below)
WEIGHT_ROLES = {"compress": "blob", "quantize": "quantized", "train": "checkpoint", "import": "checkpoint"}
SEED_FIELDS = ("val_loss", "val_bpb", "steps", "ms_per_step", "bytes_model")
SCORE_NEUTRAL_EVAL_FIELDS = ("time_budget_seconds", "budget_gpus", "enforce_time_budget")
DATA_ROLES = ("tokenizer", "val_shard")  # the inputs that fix what a score measures


def check_score(value, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or \
            not 0 < value < SCORE_LIMIT:
        raise InvalidInput(f"{what} is {value!r}, not a score (a positive number below {SCORE_LIMIT:g})")
    return float(value)


def final_train_record(directory: Path, manifest: dict) -> dict:
    """The exported weights' score from a train output's train_log.jsonl (an output the manifest's digest
    covers); a train run of an older pgolf without that record falls back to its last master validation."""
    records = []
    for line in output_path(manifest, directory, "log_jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{directory}/train_log.jsonl: a line is not JSON ({e})") from None
    final = [r for r in records if isinstance(r, dict) and r.get("event") == "final"]
    if final:
        return final[-1]
    if manifest["metrics"].get("weights") == "master":
        vals = [r for r in records if isinstance(r, dict) and r.get("event") == "val"]
        if vals:
            return vals[-1]
    raise InvalidInput(f"{directory}/train_log.jsonl: holds no record of the exported weights' score (made by an "
                       f"older pgolf); re-run train")


def run_scores(directory: Path, manifest: dict) -> dict:
    """{val_loss, val_bpb} of an eval or train output, read from a file its manifest's digests cover
    (results.json, train_log.jsonl) and required to agree with the manifest's metrics."""
    if manifest["stage"] == "eval":
        source = json.loads(output_path(manifest, directory, "results").read_text())
        where = f"{directory}/results.json"
    else:
        source, where = final_train_record(directory, manifest), f"{directory}/train_log.jsonl"
    if not isinstance(source, dict):
        raise InvalidInput(f"{where}: is not a JSON object")
    scores = {key: check_score(source.get(key), f"{where}: {key}") for key in ("val_loss", "val_bpb")}
    for key, value in scores.items():
        if manifest["metrics"].get(key) != value:
            raise InvalidInput(f"{directory}/{MANIFEST}: metric {key} {manifest['metrics'].get(key)!r} differs from "
                               f"{value!r} in {where} (edited after the stage ran)")
    return scores


def scored_weights(directory: Path, manifest: dict) -> str | None:
    """sha256 of the weights a run scored (the blob, quantized state or checkpoint): two runs that scored the
    same weights are one sample, whatever else differs."""
    if manifest["stage"] == "train":
        return output_sha256(manifest, "checkpoint")
    artifact = next((r for r in manifest["inputs"] if r["role"] == "artifact_manifest"), None)
    source = input_source(artifact, directory) if artifact is not None else None
    if source is None:
        return artifact["sha256"] if artifact is not None else None
    stage = source[1]["stage"]
    role = "checkpoint_master" if stage == "train" and manifest["config"].get("weights") == "master" \
        else WEIGHT_ROLES.get(stage)
    return output_sha256(source[1], role) or artifact["sha256"]


def read_run(directory: Path) -> dict:
    """One run's scores and provenance from an eval (post-quant) or train (pre-quant) output: its seed and train
    figures from the train run it came from (found by digest), what it scored and what it was scored on."""
    manifest = open_stage(directory, RUN_STAGES)
    scores = run_scores(Path(directory), manifest)
    found = lineage(manifest, directory, wanted=("train", "compress") if manifest["stage"] == "eval" else ())
    train = manifest if manifest["stage"] == "train" else found.get("train", (None, {}))[1]
    compress = found.get("compress", (None, {}))[1]
    train_metrics = train.get("metrics", {})
    scored_on = sorted((record["role"], record["sha256"]) for record in manifest["inputs"]
                       if record["role"] in DATA_ROLES)
    return {
        "dir": str(Path(directory).resolve()), "stage": manifest["stage"], **scores,
        "seed": train.get("config", {}).get("train", {}).get("seed"),
        "steps": train_metrics.get("steps"), "ms_per_step": train_metrics.get("ms_per_step"),
        "bytes_model": compress.get("metrics", {}).get("bytes"),
        "weights_sha256": scored_weights(Path(directory), manifest),
        "scored_on": sha256_json(scored_on),
        "eval_settings": eval_settings(manifest["config"]) if manifest["stage"] == "eval" else None,
    }


def eval_settings(config: dict) -> str:
    """Digest of what an eval's config makes it measure: the time-budget fields only judge the run (they never
    change a score), so evals differing only there are one measurement."""
    evaluation = {k: v for k, v in config.get("eval", {}).items() if k not in SCORE_NEUTRAL_EVAL_FIELDS}
    return sha256_json({**config, "eval": evaluation})


def read_runs(directories: list[Path], what: str) -> list[dict]:
    """The runs of one group: distinct outputs of one kind, distinct seeds, one validation set, one eval."""
    resolved = [Path(d).resolve() for d in directories]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise InvalidInput(f"{directories[index]}: given twice in {what}; each run counts once")
    runs = [read_run(Path(d)) for d in directories]
    if len({run["stage"] for run in runs}) > 1:
        raise UsageError(f"{what} mix eval (post-quant) and train (pre-quant) outputs; compare like "
                         f"with like")
    seen: dict = {}
    for run in runs:
        if run["seed"] is not None and run["seed"] in seen:
            raise InvalidInput(f"{run['dir']}: has seed {run['seed']}, as {seen[run['seed']]} has; runs of one "
                               f"seed are not independent samples")
        seen[run["seed"]] = run["dir"]
    require_distinct(runs)
    require_same(runs, "scored_on", "were scored on different validation data or tokenizers")
    require_same(runs, "eval_settings", "were evaluated with different settings (mode, stride, n-gram, TTT)")
    return runs


def require_distinct(runs: list[dict]) -> None:
    """Refuse two runs that scored the same weights (two evals of one blob, even when its train run is gone)."""
    scored: dict = {}
    for run in runs:
        other = scored.setdefault(run["weights_sha256"], run["dir"]) if run["weights_sha256"] else run["dir"]
        if other != run["dir"]:
            raise InvalidInput(f"{run['dir']}: scored the same weights as {other} (sha256 "
                               f"{run['weights_sha256'][:12]}...); they are one sample, not two")


def require_same(runs: list[dict], key: str, problem: str) -> None:
    for run in runs[1:]:
        if run[key] != runs[0][key]:
            raise InvalidInput(f"{run['dir']} and {runs[0]['dir']} {problem}; their scores do not compare")


def bpb_per_nat(runs: list[dict]) -> float:
    """val_bpb / val_loss, fixed by the validation set and tokenizer (read_runs made sure they agree)."""
    ratios = [run["val_bpb"] / run["val_loss"] for run in runs]
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


def verdict(tests: dict, level: float) -> dict | None:
    """The challenge's criterion, on the nats test: pass when its one-sided p is below `level`."""
    test = tests.get("nats")
    if test is None:
        return None
    p_value = test["p_value"]
    passed = None if p_value is None else p_value < level
    return {"significance": level, "p_value": p_value, "passed": passed}


@dataclass
class ReportResult:
    out: Path | None
    metrics: dict  # submission fields, tests, verdict, runs, min_improvement_nats (the manifest's, with --out)


def report(run_dirs: list[Path], *, reference: float | None = None, reference_nats: float | None = None,
           reference_runs: list[Path] = (), min_improvement_nats: float = 0.005, significance_level: float = 0.01,
           out: Path | None = None, force: bool = False, log=PlainLog) -> ReportResult:
    """Mean, std and one-sided t-tests (H1: mean < reference - margin) of the runs, in nats and bpb, and the
    verdict at `significance_level`; with `out`, submission.json and a manifest there."""
    reference_runs = list(reference_runs or [])
    if reference_runs and (reference is not None or reference_nats is not None):
        raise UsageError("give either --reference/--reference-nats or --reference-runs, not both")
    for flag, value in (("--reference", reference), ("--reference-nats", reference_nats)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a positive number, got {value}")
    if not (math.isfinite(min_improvement_nats) and min_improvement_nats >= 0):
        raise UsageError(f"--min-improvement-nats must be a number >= 0, got {min_improvement_nats}")
    if not 0 < significance_level < 1:
        raise UsageError(f"--significance must be in (0, 1), got {significance_level}")
    runs = read_runs(run_dirs, "RUN_DIRs")
    baseline = read_runs(reference_runs, "--reference-runs") if reference_runs else []
    if baseline:
        if baseline[0]["stage"] != runs[0]["stage"]:
            raise UsageError("--reference-runs must be the same kind of output (eval or train) as the RUN_DIRs")
        shared = {run["dir"] for run in runs} & {run["dir"] for run in baseline}
        if shared:
            raise UsageError(f"{sorted(shared)[0]}: is both a RUN_DIR and a --reference-runs entry")
        if baseline[0]["scored_on"] != runs[0]["scored_on"]:
            raise InvalidInput(f"{baseline[0]['dir']}: the reference runs were scored on other validation data "
                               f"or another tokenizer than {runs[0]['dir']}; their scores do not compare")
        if baseline[0]["eval_settings"] != runs[0]["eval_settings"]:
            raise InvalidInput(f"{baseline[0]['dir']}: the reference runs were evaluated with other settings (mode, "
                               f"stride, n-gram, TTT) than {runs[0]['dir']}; their scores do not compare")
        require_distinct(runs + baseline)
    tests = significance(runs, baseline, reference, reference_nats, min_improvement_nats)
    fields = submission_fields(runs, tests)
    decision = verdict(tests, significance_level)
    result = {"submission": fields, "tests": tests, "verdict": decision, "runs": runs,
              "min_improvement_nats": min_improvement_nats}
    if out is not None:
        config = {"reference": reference, "reference_nats": reference_nats, "min_improvement_nats":
                  min_improvement_nats, "significance": significance_level,
                  "reference_runs": [str(Path(p).resolve()) for p in reference_runs]}
        done = up_to_date(out, "report", config, [*run_dirs, *reference_runs], force=force, log=log)
        if done:
            return ReportResult(Path(out), done["metrics"])
        with StageOutput(out, "report", config=config, force=force, inputs=[*run_dirs, *reference_runs]) as stage:
            for run in runs + baseline:
                stage.add_input(Path(run["dir"]) / MANIFEST, "run")
            atomic_write_json(stage.add_output("submission.json", "submission"), fields)
            stage.metrics = result
            stage.finalize()
    return ReportResult(Path(out) if out is not None else None, result)


def reported_weights(report_dir: Path, manifest: dict) -> set[str]:
    """sha256 of the weights each run of a report scored (its blobs, or checkpoints for pre-quant reports); its
    reference runs are not its runs."""
    runs = {run.get("dir") for run in manifest["metrics"].get("runs", []) if isinstance(run, dict)}
    digests = set()
    for record in manifest["inputs"]:
        source = input_source(record, report_dir) if record["role"] == "run" else None
        if source is not None and str(source[0].resolve()) in runs:
            digests.add(scored_weights(*source))
    return digests
