"""`pgolf bundle`: a records-style submission folder from a train run and its blob.

The folder holds ONE self-contained train_gpt.py (pgolf's core inlined, the run's settings baked in;
optionally a self-extracting compressed copy), the blob as final_model.blob, README.md, submission.json and
the train logs.
train_gpt.py is the counted code file: `pgolf verify-size BUNDLE_DIR` counts exactly it plus the blob.
"""

import dataclasses
import json
import time
from pathlib import Path

import typer

from pgolf import log
from pgolf.artifacts import (
    ARTIFACT_BYTE_LIMIT,
    MANIFEST,
    StageOutput,
    atomic_write_bytes,
    atomic_write_json,
    copy_file,
    open_stage,
    output_path,
    output_sha256,
    upstream,
)
from pgolf.bundle import (
    SUBMISSION_BLOB,
    bundle_source,
    extracted_source,
    minified_source,
    self_extracting,
    submission_config,
)
from pgolf.codecs import read_blob
from pgolf.errors import InvalidInput, OverBudget, UsageError
from pgolf.scoring import EvalConfig
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, out_option, report

TRACK = "10min_16mb"
SUBMISSION_FIELDS = ("val_loss", "val_bpb", "val_loss_std", "val_bpb_std", "p_value", "n_seeds", "seeds",
                     "seed_results")


def lineage(train_dir: Path, blob_dir: Path) -> tuple[dict, dict, dict, Path]:
    """(train, quantize, compress manifests, quantize dir), checking by digest that the blob was made from this
    train run's checkpoint."""
    train = open_stage(train_dir, "train")
    compress = open_stage(blob_dir, "compress")
    found = upstream(compress, blob_dir, "quantize", depth=1)
    if found is None:
        raise InvalidInput(f"{blob_dir}: its manifest names no quantize output that still exists")
    quantize_dir = found[0]
    quantize = open_stage(quantize_dir, "quantize")
    checkpoint = next((i for i in quantize["inputs"] if i["role"] == "checkpoint"), None)
    train_weights = {out["sha256"] for out in train["outputs"] if out["role"] in ("checkpoint", "checkpoint_master")}
    if checkpoint is None or checkpoint["sha256"] not in train_weights:
        raise InvalidInput(f"{blob_dir}: was not made from {train_dir}'s checkpoint (via {quantize_dir})")
    return train, quantize, compress, quantize_dir


def eval_settings(evaluation: dict | None) -> dict:
    """The eval settings the submission scores with: the given eval run's, else `pgolf eval`'s defaults."""
    if evaluation is None:
        return {"eval": dataclasses.asdict(EvalConfig()), "ttt": None}
    settings = evaluation["config"]
    if len(submission_config(EvalConfig, settings["eval"]).ngram_grid()) > 1:
        raise UsageError("--eval: that run swept an n-gram grid; bundle the eval of a single setting")
    return {"eval": settings["eval"], "ttt": settings.get("ttt")}


def baked_settings(train: dict, quantize: dict, compress: dict, plan: dict, evaluation: dict | None) -> dict:
    """What `python train_gpt.py train` needs to reproduce this run's training, quantization and codec."""
    quantize_config, quantize_metrics = quantize["config"], quantize["metrics"]
    return {
        "tokenizer_sha256": train["metrics"].get("tokenizer_sha256"),
        "model": train["config"]["model"],
        "train": train["config"]["train"],
        "quantize": {
            "schemes": {name: record["scheme"] for name, record in plan["tensors"].items()},
            "clip": quantize_metrics["clip"], "scale_floor": quantize_metrics["scale_floor"],
            "gptq_damp": quantize_config["gptq_damp"], "gptq_block": quantize_config["gptq_block"],
            "calib_tokens": quantize_config["calib_tokens"],
            "calib_seq_len": quantize_config["calib_seq_len"],
            "weights": quantize_config.get("weights", "export"),
            "plan": {"plan": plan.get("plan")},
        },
        "compress": {key: compress["metrics"][key] for key in ("codec", "level", "shuffle", "bitpack")},
        "eval": eval_settings(evaluation),
    }


def open_eval(eval_dir: Path | None, compress: dict) -> dict | None:
    """The eval manifest, checked to be an evaluation of this very blob."""
    if eval_dir is None:
        return None
    evaluation = open_stage(eval_dir, "eval")
    evaluated = upstream(evaluation, eval_dir, "compress", depth=1)
    if evaluated is None or output_sha256(evaluated[1], "blob") != output_sha256(compress, "blob"):
        raise InvalidInput(f"{eval_dir}: is not an evaluation of this blob")
    return evaluation


def scores(train: dict, evaluation: dict | None, report_dir: Path | None) -> dict:
    """Score fields: a multi-seed report's, else this blob's eval, else none (pre-quant ones kept apart)."""
    fields = {"pre_quant_val_loss": train["metrics"].get("val_loss"),
              "pre_quant_val_bpb": train["metrics"].get("val_bpb")}
    if evaluation is not None:
        fields |= {key: evaluation["metrics"][key] for key in ("val_loss", "val_bpb")}
    if report_dir is not None:
        submission = output_path(open_stage(report_dir, "report"), report_dir, "submission")
        fields |= {key: value for key, value in json.loads(submission.read_text()).items()
                   if key in SUBMISSION_FIELDS}
    return fields


def readme_text(submission: dict, baked: dict, command: str) -> str:
    score = (f"val_bpb **{submission['val_bpb']:.8f}** (val_loss {submission['val_loss']:.8f})"
             if submission.get("val_bpb") is not None else "not evaluated after quantization yet")
    model, train = baked["model"], baked["train"]
    lines = [
        f"# {submission['name']}", "",
        submission.get("blurb") or "Built with pgolf (train -> quantize -> compress -> bundle).", "",
        "## Results", "",
        f"- Score: {score}",
        f"- Pre-quantization: val_bpb {submission['pre_quant_val_bpb']:.4f}",
        f"- Artifact: {submission['bytes_total']:,} bytes = model {submission['bytes_model']:,} "
        f"({baked['compress']['codec']}) + code {submission['bytes_code']:,}",
    ]
    if submission.get("seed_results"):
        lines += ["", "| Seed | val_loss | val_bpb |", "|------|----------|---------|"]
        lines += [f"| {seed} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} |"
                  for seed, r in submission["seed_results"].items()]
        if submission.get("p_value") is not None:
            lines.append(f"\nOne-sided t-test p-value: {submission['p_value']:.3g}")
    lines += [
        "", "## Configuration", "",
        f"- Model: {model['num_layers']} layers x {model['model_dim']}, {model['num_heads']} heads / "
        f"{model['num_kv_heads']} KV, MLP {model['mlp_mult']}x, vocab {model['vocab_size']}",
        f"- Training: {train['batch_tokens']:,} tokens/step, seq {train['seq_len']}, at most "
        f"{train['iterations']} steps / {train['wallclock_seconds']} s, seed {train['seed']}",
        f"- Quantization: {len(baked['quantize']['schemes'])} tensors, clip {baked['quantize']['clip']}",
        "", "```bash", command, "```", "",
        "## Included files", "",
        "- `train_gpt.py`: the counted code (`python train_gpt.py train|eval --help`)",
        f"- `{SUBMISSION_BLOB}`: the counted model blob", "- `submission.json`",
        "- `train.log`, `train_log.jsonl` (and `eval_results.json` when the blob was evaluated)",
    ]
    return "\n".join(lines) + "\n"


def bundle(
    train_dir: Path = typer.Option(..., "--train", help="The `pgolf train` output the blob came from."),
    blob_dir: Path = typer.Option(..., "--blob", help="The `pgolf compress` output to ship."),
    eval_dir: Path = typer.Option(None, "--eval", help="`pgolf eval` output of the blob (the score)."),
    report_dir: Path = typer.Option(None, "--report", help="`pgolf report` output (multi-seed fields)."),
    name: str = typer.Option(..., "--name", help="Submission name."),
    github_id: str = typer.Option(..., "--github-id", help="Your GitHub user name."),
    author: str = typer.Option(None, "--author", help="Author name (default: the GitHub id)."),
    blurb: str = typer.Option("", "--blurb", help="One-paragraph summary for README and submission.json."),
    compress_code: bool = typer.Option(False, "--compress-code", help="Ship train_gpt.py minified (no "
                                       "docstrings or comments) as a self-extracting lzma/zlib + base85 script "
                                       "(fewer counted bytes)."),
    out: Path = out_option(),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Write a records-style folder: train_gpt.py, final_model.blob, README.md, submission.json, logs.

    Example: pgolf bundle --train artifacts/run1/train --blob artifacts/run1/blob --eval artifacts/run1/eval
    --name "11L int6 brotli" --github-id me --out artifacts/run1/submission
    """
    train, quantize, compress, quantize_dir = lineage(train_dir, blob_dir)
    blob_path = output_path(compress, blob_dir, "blob")
    _, plan = read_blob(blob_path)
    evaluation = open_eval(eval_dir, compress)
    baked = baked_settings(train, quantize, compress, plan, evaluation)
    config = {"baked": baked, "compress_code": compress_code}
    inputs = [train_dir, quantize_dir, blob_dir] + [p for p in (eval_dir, report_dir) if p is not None]
    with StageOutput(out, "bundle", config=config, force=force, inputs=inputs) as stage:
        source = bundle_source(baked, f"{name}: Parameter Golf submission by {author or github_id}")
        if compress_code:  # the shipped program is the minified one: comments and docstrings are counted bytes
            source = minified_source(source)
        code = self_extracting(source) if compress_code else source
        if compress_code and extracted_source(code) != source:
            raise RuntimeError("self-extracting script does not reproduce the bundled source (a bundler bug)")
        bytes_model, bytes_code = blob_path.stat().st_size, len(code.encode())
        if bytes_model + bytes_code > ARTIFACT_BYTE_LIMIT:
            raise OverBudget(f"{blob_dir}: model {bytes_model:,} + code {bytes_code:,} bytes exceed the "
                             f"{ARTIFACT_BYTE_LIMIT:,}-byte cap by "
                             f"{bytes_model + bytes_code - ARTIFACT_BYTE_LIMIT:,}")
        submission = {
            "name": name, "author": author or github_id, "github_id": github_id, "blurb": blurb,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "track": TRACK,
            "val_loss": None, "val_bpb": None,
            **scores(train, evaluation, report_dir),
            "bytes_total": bytes_model + bytes_code, "bytes_code": bytes_code, "bytes_model": bytes_model,
            "hardware": train.get("environment", {}).get("gpu"),
            "pytorch_version": train.get("environment", {}).get("torch"),
        }
        if submission["val_bpb"] is None:
            log.warn("no --eval or --report: submission.json has no post-quantization score yet")
        command = "torchrun --standalone --nproc_per_node=8 train_gpt.py train --data DATA_DIR"
        for directory, role in ((train_dir, "train"), (quantize_dir, "quantize"), (blob_dir, "compress"),
                                (eval_dir, "eval"), (report_dir, "report")):
            if directory is not None:
                stage.add_input(directory / MANIFEST, role)
        atomic_write_bytes(stage.add_output("train_gpt.py", "code"), code.encode())
        copy_file(blob_path, stage.add_output(SUBMISSION_BLOB, "blob"))
        atomic_write_json(stage.add_output("submission.json", "submission"), submission)
        readme = readme_text(submission, baked, command)
        atomic_write_bytes(stage.add_output("README.md", "readme"), readme.encode())
        for role, file_name in (("log", "train.log"), ("log_jsonl", "train_log.jsonl")):
            copy_file(output_path(train, train_dir, role), stage.add_output(file_name, role))
        if evaluation is not None:
            copy_file(output_path(evaluation, eval_dir, "results"), stage.add_output("eval_results.json",
                                                                                     "eval_results"))
        stage.metrics = {key: submission[key] for key in ("bytes_total", "bytes_code", "bytes_model",
                                                          "val_loss", "val_bpb")}
        stage.check("fits_cap", True, f"{bytes_model + bytes_code:,} <= {ARTIFACT_BYTE_LIMIT:,} bytes")
        stage.finalize()
    lines = [f"{out}/train_gpt.py: {bytes_code:,} B{' (self-extracting)' if compress_code else ''}",
             f"{out}/{SUBMISSION_BLOB}: {bytes_model:,} B",
             f"total {bytes_model + bytes_code:,} B, margin {ARTIFACT_BYTE_LIMIT - bytes_model - bytes_code:,} B"]
    report({"out": str(out), **stage.metrics}, as_json, lines)


def register(app: typer.Typer) -> None:
    app.command("bundle")(bundle)
