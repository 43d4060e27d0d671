"""`pgolf import CHECKPOINT --record R --out DIR`: parse, run pgolf.record_import.import_checkpoint, print.

(The module is import_cmd because `import` is a Python keyword; the command is `pgolf import`.)
"""

import dataclasses
from pathlib import Path

import typer

from pgolf import log
from pgolf.errors import UsageError
from pgolf.model import ModelConfig
from pgolf.record_import import RECORD_NAMES, ImportConfig, import_checkpoint
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, out_option, report

EXAMPLE = ("pgolf import final_model.pt --record 0416 --set SMEAR_GATE=1 --set GATE_ATTN_OUT=1 "
           "--set QK_GAIN_INIT=5.25 --tokenizer fineweb_8192_bpe.model --out artifacts/r0416/import")
SHAPE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult")


def import_command(
    checkpoint: Path = typer.Argument(..., help="The record's final_model.pt (its torch.save'd state dict, read "
                                      "with weights_only) or a safetensors state dict."),
    out: Path = out_option(),
    record: str = typer.Option(None, "--record", help=f"The record whose env settings describe the model, with "
                               f"its script's defaults: {', '.join(RECORD_NAMES)} (2026-04-16, 2026-03-22)."),
    env_file: Path = typer.Option(None, "--env", help="A file of the run's KEY=VALUE env settings (one a line; "
                                  "# comments; `export` allowed)."),
    settings: list[str] = typer.Option(None, "--set", help="One env setting KEY=VALUE of the run (repeatable; "
                                       "after --env)."),
    config_file: Path = typer.Option(None, "--config", help="Instead of --record: a pgolf TOML whose [model] "
                                     "table describes the model."),
    data: Path = typer.Option(None, "--data", help="A `pgolf tokenize` output (or shard directory): its "
                              "tokenizer."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="The SentencePiece model the run used."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Import a challenge record's checkpoint as a pgolf stage output (model.safetensors + manifest, stage
    'import') that quantize, compress and eval read like a train output. Only the settings given are read (not
    the shell's environment). Exit 2: a setting that is unknown to the record's script, malformed, or describes a
    model pgolf cannot express (named); exit 3: a checkpoint that needs a full unpickle, or whose tensors do not
    match the model (the first differing tensor is named), or a tokenizer of another vocabulary size. bundle
    refuses an import: it bakes a pgolf training run to repeat, which an import does not have.

    Example: pgolf import final_model.pt --record 0416 --set SMEAR_GATE=1 --set GATE_ATTN_OUT=1
    --set QK_GAIN_INIT=5.25 --tokenizer fineweb_8192_bpe.model --out artifacts/r0416/import
    """
    try:
        config = ImportConfig(record=record or "", settings=tuple(settings or ()))
    except ValueError as e:
        raise UsageError(f"{e} (example: {EXAMPLE})") from None
    result = import_checkpoint(config, checkpoint, out, env_file=env_file, config_file=config_file, data=data,
                               tokenizer=tokenizer, force=force, log=log)
    report(result.metrics, as_json, summary_lines(result.metrics, result.model_config), out)


def summary_lines(metrics: dict, config: ModelConfig) -> list[str]:
    defaults = ModelConfig()
    changed = [f.name for f in dataclasses.fields(config)
               if f.name not in SHAPE_FIELDS and getattr(config, f.name) != getattr(defaults, f.name)]
    lines = [f"{metrics['record'] or 'config file'}: {metrics['tensors']} tensors, {metrics['param_count']:,} "
             f"parameters; {config.num_layers} layers x {config.model_dim}, {config.num_heads}/"
             f"{config.num_kv_heads} heads, MLP {config.mlp_mult:g}x, vocab {config.vocab_size}",
             f"non-default model fields: {', '.join(changed) or 'none'}"]
    lines += [f"dropped {name}: {why}" for name, why in metrics["dropped"].items()]
    return lines


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
