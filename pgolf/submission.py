"""A submission's entry point: what the bundled train_gpt.py runs (`pgolf bundle` inlines this module and the
core modules it imports into one file, with the run's settings baked in as BAKED).

    python train_gpt.py train --data DIR     train, quantize, compress, then evaluate the round trip
    python train_gpt.py eval --blob B --data DIR    evaluate a model blob

Each step calls the same core function as its pgolf stage (pgolf.train.train_model, pgolf.quantize.quantize_model,
pgolf.compress.compress_quantized, pgolf.evaluate.score_model) with the configs the run's manifests recorded
(BAKED holds each config's to_dict), so the submission cannot drift from what pgolf ran.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch.distributed as dist

from pgolf.artifacts import atomic_write_bytes
from pgolf.compress import CompressConfig, compress_quantized
from pgolf.config import from_dict
from pgolf.dist import env_rank, finish_distributed, init_distributed
from pgolf.errors import PgolfError
from pgolf.evaluate import EvalConfig, score_model, val_data
from pgolf.model import ModelConfig, build_model
from pgolf.plans import plan_from_mapping
from pgolf.quantize import QuantizeConfig, quantize_model
from pgolf.stage_model import check_tokenizer_match, load_blob_model
from pgolf.train import exported_state, load_training_data, train_model
from pgolf.train_config import TrainConfig
from pgolf.trainer import Trainer
from pgolf.ttt import TTTConfig

SUBMISSION_BLOB = "final_model.blob"
SUBMISSION_CONFIGS = {"model": ModelConfig, "train": TrainConfig, "quantize": QuantizeConfig,
                      "compress": CompressConfig, "eval": EvalConfig, "ttt": TTTConfig}


class SubmissionLog:
    """The submission's log, like the records' train_gpt.py: every line on stdout, rank 0 only."""

    @staticmethod
    def info(message: str) -> None:
        if env_rank() == 0:
            print(message, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        SubmissionLog.info(f"warning: {message}")


def submission_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_gpt.py", description="Retrain and export this submission, or evaluate its model blob. "
        "With no command it trains (torchrun --standalone --nproc_per_node=8 train_gpt.py).")
    commands = parser.add_subparsers(dest="command")
    for name, text in (("train", "train, quantize, compress, then evaluate the round trip"),
                       ("eval", "evaluate a model blob on the validation split")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--data", default=os.environ.get("DATA_PATH"), help="Shard directory "
                             "(fineweb_{train,val}_*.bin; default $DATA_PATH).")
        command.add_argument("--tokenizer", default=os.environ.get("TOKENIZER_PATH"),
                             help="SentencePiece model (default $TOKENIZER_PATH, else next to the shards).")
    commands.choices["train"].add_argument("--out", default=".", help="Where the blob and logs go.")
    commands.choices["train"].add_argument("--iterations", type=int, default=os.environ.get("ITERATIONS"),
                                           help="Override the baked step limit (default $ITERATIONS).")
    commands.choices["train"].add_argument("--wallclock", type=float,
                                           default=os.environ.get("MAX_WALLCLOCK_SECONDS"),
                                           help="Override the baked training-time cap in seconds.")
    commands.choices["eval"].add_argument("--blob", default=SUBMISSION_BLOB, help="The model blob.")
    args = parser.parse_args(argv or ["train"])
    if args.data is None:
        parser.error("--data DIR (or $DATA_PATH) is required")
    return args


def submission_configs(baked: dict) -> dict:
    """Each baked config dict back as its frozen config (None where the run had none, e.g. no TTT)."""
    return {key: None if baked[key] is None else from_dict(cls, baked[key], f"BAKED[{key!r}]")
            for key, cls in SUBMISSION_CONFIGS.items()}


def submission_result_line(result: dict) -> str:
    return (f"final_roundtrip_exact val_loss:{result['val_loss']:.8f} val_bpb:{result['val_bpb']:.8f} "
            f"val_tokens:{result['tokens']} val_bytes:{result['bytes']}")


def submission_score(blob_path: Path, args: argparse.Namespace, configs: dict, dist_info, log) -> dict:
    """The blob's model scored as `pgolf eval` scores it, with the run's eval settings. The tokenizer is checked
    against the blob's own model config and recorded digest (the blob may come from another run)."""
    state, model_config, plan = load_blob_model(blob_path)
    data = val_data(Path(args.data), args.tokenizer, model_config.vocab_size, plan.get("tokenizer_sha256"), log)
    model = build_model(state, model_config, dist_info.device)
    return score_model(model, configs["eval"], configs["ttt"], data, dist_info, log=log)


def submission_train(baked: dict, args: argparse.Namespace, log) -> None:
    configs = submission_configs(baked)
    model_config, quantize_config = configs["model"], configs["quantize"]
    overrides = {"iterations": args.iterations, "wallclock_seconds": args.wallclock, "checkpoint_every": 0}
    train_config = from_dict(TrainConfig, {**baked["train"], **{k: v for k, v in overrides.items() if v is not None}},
                             "train_gpt.py train")
    dist_info = init_distributed(fast_math=True)
    data = load_training_data(Path(args.data), args.tokenizer, model_config.vocab_size, train_config.seq_len)
    check_tokenizer_match(model_config.vocab_size, baked["tokenizer_sha256"], data.tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model_config, train_config, data.train, dist_info, data_fingerprint=data.fingerprint)
    metrics = train_model(trainer, data, out, log=log)
    blob_path = out / SUBMISSION_BLOB
    if dist_info.is_main:
        state = exported_state(trainer, metrics, quantize_config.weights)
        code_bytes = Path(__file__).stat().st_size  # this very file is the counted code: size the fit with it
        made = quantize_model(state, model_config, plan_from_mapping(baked["plan"], "BAKED['plan']"),
                              dataclasses.replace(quantize_config, code_bytes=code_bytes), train_shards=data.train,
                              data_name=args.data, tokenizer_sha256=data.tokenizer_sha256,
                              hessians=trainer.hessians if quantize_config.weights == "export" else None, log=log)
        blob = compress_quantized(made.tensors, made.plan, configs["compress"], log)[0]["blob"]
        atomic_write_bytes(blob_path, blob)
        log.info(f"Serialized model: {len(blob)} bytes")
        log.info(f"Code size: {code_bytes} bytes")
        log.info(f"Total submission size: {len(blob) + code_bytes} bytes")
    if dist_info.world_size > 1:
        dist.barrier()  # every rank scores the blob rank 0 wrote
    result = submission_score(blob_path, args, configs, dist_info, log)
    if dist_info.is_main:
        print(submission_result_line(result), flush=True)


def submission_main(baked: dict, argv: list[str] | None = None) -> None:
    args = submission_arguments(sys.argv[1:] if argv is None else argv)
    completed = False
    try:
        if args.command == "eval":
            dist_info = init_distributed()
            result = submission_score(Path(args.blob), args, submission_configs(baked), dist_info, SubmissionLog)
            if dist_info.is_main:
                print(submission_result_line(result), flush=True)
        else:
            submission_train(baked, args, SubmissionLog)
        completed = True
    except PgolfError as e:  # one line and the documented exit code, as `pgolf` prints them
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        finish_distributed(completed)
