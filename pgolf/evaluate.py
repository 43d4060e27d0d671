"""The eval stage: exact val_loss / val_bpb of a train, import, quantize or compress output on a shard
directory.

`score_model` is the flow both `pgolf eval` and the bundled train_gpt.py run: resolve the window plan, warm up on
random tokens (never validation tokens), score the validation stream once with the n-gram grid and TTT
(pgolf.scoring), and report every figure. `evaluate` wraps it as a stage: it loads the artifact and the data,
optionally checks C1-C4 first, and writes results.json with a manifest.

One process, or torchrun's ranks: each rank scores a contiguous share of the windows and the float64 sums are
all-reduced; n-gram counts are fast-forwarded over the earlier ranks' tokens so every rank mixes exactly as one
process would; TTT runs on rank 0 alone (its weights depend on every earlier chunk, so the order cannot be split).
"""

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pgolf.artifacts import MANIFEST, StageOutput, atomic_write_json, output_path, sha256_json, up_to_date
from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.compliance import check_eval, require
from pgolf.config import to_dict
from pgolf.dist import Distributed, PlainLog, env_rank, init_distributed
from pgolf.errors import ComplianceError, InvalidInput, UsageError
from pgolf.model import build_model
from pgolf.ngram import NgramConfig, TiltConfig
from pgolf.scoring import EvalModel, EvalPlan, ngram_name, score_stream, warm_up
from pgolf.shards import BOS_ID, load_split, open_dataset
from pgolf.stage_model import check_tokenizer_match, load_stage_model
from pgolf.ttt import TTTConfig, batched_seconds_on

PROGRESS_SECONDS = 15.0


@dataclass(frozen=True)
class EvalConfig:
    seq_len: int = 0  # tokens a window reads; 0 = the model's max_seq_len
    sliding_stride: int = 0  # targets scored per window after the first; 0 = seq_len (flat chunks)
    doc_isolated: bool = False  # a window never reads tokens before its target's document's BOS
    batch_seqs: int = 32  # windows per forward pass (padded to this: one compiled shape)
    compile: bool = True  # torch.compile the forward on CUDA (never on CPU)
    ngram_order: tuple[int, ...] = ()  # n-gram cache orders (several = a sweep); empty = no cache
    alpha: tuple[float, ...] = (0.4,)  # n-gram weights (several = a sweep); the ceiling in entropy mode
    alpha_mode: str = "fixed"  # fixed | entropy (weight rises with the model's entropy)
    ngram_buckets: int = 65536  # hashed context rows per order (shared by the cache and the tilt)
    tilt_order: tuple[int, ...] = ()  # token tilt: longest hint contexts (several = a sweep); empty = no tilt
    tilt_boost: tuple[float, ...] = (1.0,)  # tilt boosts b (several = a sweep)
    tilt_threshold: tuple[float, ...] = (0.5,)  # tilt gate: the hint's least share of its context's counts
    tilt_min_count: int = 2  # tilt gate: the least counted followers of the hint's context
    tilt_gamma: float = 0.0  # adaptive tilt b * (1 - q_hint)^gamma; 0 = fixed boost
    ttt: bool = False  # score-first test-time training (settings: --ttt-* / the ttt config)
    time_budget_seconds: float = 0.0  # eval time budget on budget_gpus GPUs (the challenge: 600); 0 = none
    budget_gpus: int = 8  # the GPU count the budget is for (the challenge: 8xH100)
    enforce_time_budget: bool = False  # exit 5 (results still written) when the estimate exceeds the budget

    def __post_init__(self):
        if self.seq_len < 0:
            raise ValueError(f"seq_len = {self.seq_len}: must be >= 0 (0 = the model's max_seq_len)")
        if self.sliding_stride < 0 or (self.seq_len and self.sliding_stride > self.seq_len):
            raise ValueError(f"sliding_stride = {self.sliding_stride}: must be in [0, seq_len] (0 = flat)")
        if self.batch_seqs < 1:
            raise ValueError(f"batch_seqs = {self.batch_seqs}: must be >= 1")
        if not self.alpha:
            raise ValueError("alpha: must list at least one value")
        if not 0 <= self.time_budget_seconds < float("inf"):
            raise ValueError(f"time_budget_seconds = {self.time_budget_seconds}: must be >= 0 (0 = no budget)")
        if self.budget_gpus < 1:
            raise ValueError(f"budget_gpus = {self.budget_gpus}: must be >= 1")
        if self.enforce_time_budget and not self.time_budget_seconds:
            raise ValueError("enforce_time_budget: needs time_budget_seconds > 0")
        if not self.tilt_boost or not self.tilt_threshold:
            raise ValueError("tilt_boost, tilt_threshold: must list at least one value")
        self.ngram_grid()  # NgramConfig and TiltConfig check each grid point's ranges

    def stride(self, seq_len: int) -> int:
        return self.sliding_stride or seq_len

    def mode(self, seq_len: int) -> str:
        if self.doc_isolated:
            return "doc"
        return "sliding" if self.stride(seq_len) < seq_len else "flat"

    def plan(self, max_seq_len: int) -> EvalPlan:
        """The window plan for a model of `max_seq_len`; UsageError for a window it cannot read."""
        seq_len = self.seq_len or max_seq_len
        if seq_len > max_seq_len:
            raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len {max_seq_len}")
        if self.stride(seq_len) > seq_len:
            raise UsageError(f"--sliding-stride {self.sliding_stride} exceeds --seq-len {seq_len}")
        return EvalPlan(seq_len, self.stride(seq_len), self.doc_isolated, self.batch_seqs)

    def ngram_grid(self) -> list[NgramConfig | TiltConfig]:
        """Every n-gram cache point, then every token tilt point: one sweep scores them all from one pass."""
        cache = [NgramConfig(order, alpha, self.alpha_mode, self.ngram_buckets)
                 for order in self.ngram_order for alpha in self.alpha]
        tilt = [TiltConfig(order, boost, threshold, self.tilt_min_count, self.tilt_gamma, self.ngram_buckets)
                for order in self.tilt_order for boost in self.tilt_boost for threshold in self.tilt_threshold]
        return cache + tilt



def open_val_data(data: Path, tokenizer: Path | None):
    """The dataset, its val shards (and tokenizer) digest-checked against a tokenize manifest when it has one."""
    dataset = open_dataset(data, tokenizer, verify=("val",))
    if not dataset.val:
        raise InvalidInput(f"{data}: no val shards (fineweb_val_*.bin)")
    if dataset.tokenizer is None:
        raise InvalidInput(f"{data}: no tokenizer (*.model) next to the shards or in ../../tokenizers "
                           f"(pass --tokenizer)")
    return dataset


def load_val_tokens(dataset, vocab_size: int, log=PlainLog) -> np.ndarray:
    """All val shards concatenated; refuses ids the model cannot embed."""
    tokens = load_split(dataset.val)
    if len(tokens) < 2:
        raise InvalidInput(f"{dataset.val[0]}: the val split has {len(tokens)} tokens, nothing to score")
    if int(tokens.max()) >= vocab_size:
        raise InvalidInput(f"{dataset.directory}: val token {int(tokens.max())} >= the model's vocab_size "
                           f"{vocab_size} (shards made with another tokenizer)")
    if tokens[0] != BOS_ID:
        log.warn(f"{dataset.val[0]}: the val stream starts with token {int(tokens[0])}, not BOS")
    return tokens


@dataclass
class ValData:
    """What a model is scored on: the dataset, its val tokens and the bpb byte tables of its tokenizer."""

    dataset: object  # pgolf.shards.Dataset
    tokens: np.ndarray
    tables: object  # pgolf.bpb.ByteTables


def val_data(data: Path, tokenizer: Path | None, vocab_size: int, tokenizer_sha256: str | None,
             log=PlainLog) -> ValData:
    """The val split of `data`, refused (exit 3) unless its tokenizer is the model's: the same vocabulary size
    and, when the model records one, the same sha256."""
    dataset = open_val_data(data, tokenizer)
    check_tokenizer_match(vocab_size, tokenizer_sha256, dataset.tokenizer)
    if not tokenizer_sha256:
        log.warn(f"the model records no tokenizer digest: {dataset.tokenizer} is checked by its vocabulary size "
                 f"only, so a score with another tokenizer of that size would go unnoticed")
    tokens = load_val_tokens(dataset, vocab_size, log)
    return ValData(dataset, tokens, build_byte_tables(load_tokenizer(dataset.tokenizer), vocab_size))


def compliance_tokens(dataset, count: int, val: np.ndarray) -> tuple[np.ndarray, str]:
    """A prefix for the compliance check: training tokens when there are any (the check never needs val)."""
    if dataset.train:
        train = load_split(dataset.train[:1])
        if len(train) >= count:
            return np.asarray(train[:count], dtype=np.int64), "train"
    return np.asarray(val[:count], dtype=np.int64), "val"


def point_settings(config) -> dict:
    """One grid point's settings for results.json (`kind`: ngram | tilt)."""
    return {"kind": "tilt" if isinstance(config, TiltConfig) else "ngram", **dataclasses.asdict(config)}


def sweep_rows(totals: dict, grid) -> list[dict]:
    """One row per grid point, best (lowest val_bpb) first."""
    rows = []
    for config in grid:
        point = totals[ngram_name(config)]
        rows.append({"kind": "tilt" if isinstance(config, TiltConfig) else "ngram", "name": ngram_name(config),
                     **dataclasses.asdict(config), "val_loss": point.val_loss, "val_bpb": point.val_bpb})
    return sorted(rows, key=lambda row: row["val_bpb"])


def progress_logger(started: float, log):
    last = [started]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] < PROGRESS_SECONDS:
            return
        last[0] = now
        rate = done / max(now - started, 1e-9)
        eta = (total - done) / rate if rate else float("inf")
        log.info(f"scored {done:,}/{total:,} targets on this rank, {rate:,.0f} tokens/s, ETA {eta:,.0f} s")

    return progress


def run_compliance(model, data: ValData, plan: EvalPlan, grid, ttt_settings, dist_info: Distributed,
                   log) -> list[dict]:
    """C1-C4 on rank 0 (a float64 CPU copy, a short prefix); every rank learns the outcome, so all exit 5."""
    failure, checks = None, []
    if dist_info.is_main:
        prefix, source = compliance_tokens(data.dataset, plan.seq_len + 8 * plan.stride + 1, data.tokens)
        # The prefix holds a few windows: score them one per batch (and TTT in quarters), so the n-gram
        # counts and TTT weights update several times inside it.
        check_plan = dataclasses.replace(plan, batch_seqs=1)
        if ttt_settings is not None:
            chunk_tokens = min(ttt_settings.chunk_tokens, max(1, len(prefix) // 4))
            ttt_settings = dataclasses.replace(ttt_settings, chunk_tokens=chunk_tokens)
        log.info(f"compliance: checking C1-C4 on {len(prefix):,} {source} tokens (float64, CPU)")
        results = check_eval(model, prefix, check_plan, data.tables, grid, ttt_settings)
        for r in results:
            (log.info if r.ok else log.warn)(f"compliance {r.name}: {'ok' if r.ok else 'FAILED'}: {r.detail}")
            checks.append({"name": r.name, "ok": r.ok, "detail": r.detail, "tokens": len(prefix),
                           "source": source})
        try:
            require(results)
        except ComplianceError as e:
            failure = e
    if dist.is_initialized():
        failed = torch.tensor([int(failure is not None)], device=dist_info.device)
        dist.all_reduce(failed)
        if failed.item() and failure is None:
            failure = ComplianceError("a compliance check failed on rank 0")
    if failure is not None:
        raise failure
    return checks


def ttt_summary(settings: TTTConfig | None, result, gpus: int, world_size: int) -> dict | None:
    """TTT's settings and figures; batched mode adds its schedule's seconds here and on `gpus` GPUs."""
    if settings is None:
        return None
    summary = {"config": to_dict(settings)}
    if result is not None:
        summary.update(train_seconds=result.train_seconds, score_seconds=result.score_seconds,
                       steps=result.steps, updates=sum(1 for event in result.events if event[0] == "update"))
        if result.segments:
            summary["schedule"] = {"batches": len(result.batch_seconds), "segments": len(result.segments),
                                   "phase_seconds": result.phase_seconds, "measured_seconds": result.loop_seconds,
                                   "gpus": gpus, "estimated_seconds": batched_seconds_on(result, gpus, world_size)}
    return summary


def score_model(model, config: EvalConfig, ttt_settings: TTTConfig | None, data: ValData, dist_info: Distributed,
                log=PlainLog) -> dict:
    """Score a GPT (in eval mode, on this rank's device) on `data`'s val stream: the whole flow of `pgolf eval`
    once the inputs are loaded (and, when asked, checked for compliance). Returns every figure results.json
    holds, except the artifact's own."""
    plan = config.plan(model.config.max_seq_len)
    grid = config.ngram_grid()
    device = dist_info.device
    eval_model = EvalModel(model, compile=config.compile and device.type == "cuda")
    warmup_seconds = warm_up(eval_model, model.config.vocab_size, plan.seq_len, plan.batch_seqs, device)
    passed = score_stream(eval_model, data.tokens, plan, data.tables, device, ngram=grid, ttt_config=ttt_settings,
                          rank=dist_info.rank, world_size=dist_info.world_size,
                          progress=progress_logger(time.perf_counter(), log))
    totals = passed.totals
    primary = totals[ngram_name(grid[0])] if len(grid) == 1 else totals["model"]
    return {
        "mode": config.mode(plan.seq_len), "seq_len": plan.seq_len, "stride": plan.stride,
        "doc_isolated": plan.doc_isolated, "world_size": dist_info.world_size, "device": str(device),
        "val_loss": primary.val_loss, "val_bpb": primary.val_bpb, "tokens": primary.targets,
        "bytes": primary.bytes, "model_val_loss": totals["model"].val_loss,
        "model_val_bpb": totals["model"].val_bpb,
        "ngram": point_settings(grid[0]) if len(grid) == 1 else None,
        "sweep": sweep_rows(totals, grid) if len(grid) > 1 else None,
        "ttt": ttt_summary(ttt_settings, passed.ttt, config.budget_gpus, dist_info.world_size),
        "timers": {"warmup_seconds": warmup_seconds, "eval_seconds": passed.eval_seconds},
        "tokens_per_second": primary.targets / max(passed.eval_seconds, 1e-9),
    }


def estimate_eval_seconds(timers: dict, world_size: int, gpus: int, serial: bool = False,
                          schedule: dict | None = None) -> float:
    """The eval's wall time on `gpus` GPUs from this run's timers on `world_size` ranks: the fixed costs (load,
    warm-up: every GPU pays them in parallel) plus the scored pass scaled by world_size / gpus (each rank scores
    its share, so per-GPU work is proportional to 1 / ranks). `serial`: the pass runs on one rank whatever the
    world size (pgolf's TTT), so it is not scaled. `schedule` (batched TTT's, for these `gpus`): its batches and
    phases take its estimate (the busiest GPU's batches, not an even share), the rest of the pass is scaled."""
    scale = 1.0 if serial else world_size / gpus
    fixed = timers["load_seconds"] + timers["warmup_seconds"]
    if schedule is not None:
        rest = max(timers["eval_seconds"] - schedule["measured_seconds"], 0.0)
        return fixed + rest * scale + schedule["estimated_seconds"]
    return fixed + timers["eval_seconds"] * scale


def eval_timing(config: EvalConfig, timers: dict, world_size: int, serial: bool, ttt: dict | None = None) -> dict:
    """results.json's `timing`: measured (load + warm-up + scored pass incl. TTT; the compliance check is
    pgolf's, not the submission's, so it is left out), the estimate on budget_gpus GPUs, and the budget."""
    measured = timers["load_seconds"] + timers["warmup_seconds"] + timers["eval_seconds"]
    schedule = (ttt or {}).get("schedule")
    estimated = estimate_eval_seconds(timers, world_size, config.budget_gpus, serial, schedule)
    budget = config.time_budget_seconds or None
    return {"measured_seconds": measured, "world_size": world_size, "estimated_seconds": estimated,
            "gpus": config.budget_gpus, "budget_seconds": budget,
            "within_budget": None if budget is None else estimated <= budget}


def over_budget_message(timing: dict) -> str:
    return (f"eval time: estimated {timing['estimated_seconds']:.2f} s on {timing['gpus']} GPU(s) (measured "
            f"{timing['measured_seconds']:.2f} s on {timing['world_size']} rank(s)) exceeds the "
            f"{timing['budget_seconds']:g} s budget")


def default_out(artifact: Path, config: EvalConfig, ttt_settings, weights: str, data: Path,
                tokenizer: Path | None) -> Path:
    """`eval-<artifact>-<mode>[...]-<digest>` beside ARTIFACT: one directory per artifact, mode and settings, so
    evaluations never collide, not even of two artifacts in one run folder (the digest covers the artifact's
    path and every setting, the name shows the main ones)."""
    parts = ["eval", Path(artifact).name, f"sliding{config.sliding_stride}" if config.sliding_stride else "flat"]
    if config.seq_len:
        parts.append(f"seq{config.seq_len}")
    if config.doc_isolated:
        parts.append("doc")
    if config.ngram_order:
        parts.append("ngram" + "_".join(map(str, config.ngram_order)) + "-a" + "_".join(f"{a:g}" for a in
                                                                                        config.alpha))
        if config.alpha_mode != "fixed":
            parts.append(config.alpha_mode)
    if config.tilt_order:
        parts.append("tilt" + "_".join(map(str, config.tilt_order)) + "-b" + "_".join(f"{b:g}" for b in
                                                                                     config.tilt_boost))
    if ttt_settings is not None:
        parts.append(f"ttt-{ttt_settings.mode}")
    if weights != "export":
        parts.append(weights)
    settings = {"artifact": str(Path(artifact).resolve()), "eval": to_dict(config),
                "ttt": to_dict(ttt_settings) if ttt_settings else None, "weights": weights,
                "data": str(Path(data).resolve()),
                "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None}
    return Path(artifact).parent / ("-".join(parts) + "-" + sha256_json(settings)[:8])


@dataclass
class EvalResult:
    out: Path
    metrics: dict  # results.json: val_loss, val_bpb, tokens, bytes, mode, timers, ... (every rank has the totals)


def evaluate(config: EvalConfig, ttt_settings: TTTConfig | None, artifact: Path, data: Path,
             out: Path | None = None, *, tokenizer: Path | None = None, weights: str = "export",
             check_compliance: bool = False, device: str = "auto", config_files: tuple[Path, ...] = (),
             force: bool = False, log=PlainLog) -> EvalResult:
    """Score `artifact` (a train, import, quantize or compress output) on `data`'s val split into `out` (default:
    default_out); rank 0 writes results.json and the manifest (or, up_to_date, reports the ones already there).
    `config_files` only join the run's inputs."""
    out = Path(out) if out else default_out(artifact, config, ttt_settings, weights, data, tokenizer)
    resolved = {"eval": to_dict(config), "ttt": to_dict(ttt_settings) if ttt_settings else None,
                "weights": weights}
    # The tokenizer found beside the shards (or in ../../tokenizers) is an input as much as one given.
    tokenizer_path = tokenizer or open_dataset(data, verify=()).tokenizer
    inputs = [artifact, data] + [p for p in (tokenizer_path, *config_files) if p is not None]
    done = up_to_date(out, "eval", resolved, inputs, force=force, log=log)
    if done:
        result = json.loads(output_path(done, out, "results").read_bytes())
        enforce_time_budget(config, result, out, log)
        return EvalResult(out, result)
    stage = None
    if env_rank() == 0:
        # Before any work: a second run on this --out, or an output --force may not replace, fails now.
        stage = StageOutput(out, "eval", config=resolved, force=force, inputs=inputs)
    with stage or contextlib.nullcontext():
        dist_info = init_distributed(device)
        state, model_config, info = load_stage_model(artifact, None, weights)
        data_in = val_data(data, tokenizer, model_config.vocab_size, info["tokenizer_sha256"], log)
        started = time.perf_counter()
        model = build_model(state, model_config, dist_info.device)
        load_seconds = info["load_seconds"] + time.perf_counter() - started
        log.info(f"{artifact}: {info['kind']} artifact, {sum(t.numel() for t in state.values()):,} parameters; "
                 f"{len(data_in.tokens):,} val tokens; {dist_info.world_size} rank(s) on {dist_info.device}")
        checks, compliance_seconds = [], 0.0
        if check_compliance:
            started = time.perf_counter()
            checks = run_compliance(model, data_in, config.plan(model_config.max_seq_len), config.ngram_grid(),
                                    ttt_settings, dist_info, log)
            compliance_seconds = time.perf_counter() - started
        scored = score_model(model, config, ttt_settings, data_in, dist_info, log)
        result = {"artifact": str(Path(artifact).resolve()), "kind": info["kind"], "weights": weights,
                  "data": str(Path(data).resolve()), **scored, "checks": checks}
        result["timers"] = {"load_seconds": load_seconds, **scored["timers"],
                            "compliance_seconds": compliance_seconds}
        serial = ttt_settings is not None and ttt_settings.mode != "batched"  # batched TTT splits over ranks
        result["timing"] = eval_timing(config, result["timers"], dist_info.world_size, serial, result["ttt"])
        if stage is not None:
            write_eval_outputs(stage, result, data_in.dataset, config_files)
    enforce_time_budget(config, result, out, log)
    return EvalResult(out, result)


def enforce_time_budget(config: EvalConfig, result: dict, out: Path, log) -> None:
    """Warn when the estimated eval time is over the budget; with --enforce-time-budget, ComplianceError (rank 0,
    once results.json is written)."""
    if result["timing"]["within_budget"] is not False:
        return
    log.warn(over_budget_message(result["timing"]))
    if config.enforce_time_budget and env_rank() == 0:
        raise ComplianceError(f"{over_budget_message(result['timing'])} (--enforce-time-budget; results in {out})")


def write_eval_outputs(stage: StageOutput, result: dict, dataset, config_files: tuple[Path, ...] = ()) -> None:
    """results.json and the manifest (metrics: val_loss, val_bpb, tokens, bytes, mode, timers, ...)."""
    stage.add_input(Path(result["artifact"]) / MANIFEST, "artifact_manifest")
    stage.add_input(dataset.tokenizer, "tokenizer")
    for path in dataset.val:
        stage.add_input(path, "val_shard")
    for path in config_files:
        stage.add_input(path, "config")
    atomic_write_json(stage.add_output("results.json", "results"), result)
    stage.metrics = {key: result[key] for key in (
        "val_loss", "val_bpb", "tokens", "bytes", "mode", "seq_len", "stride", "model_val_loss",
        "model_val_bpb", "ngram", "sweep", "ttt", "timers", "timing", "kind", "world_size")}
    for check in result["checks"]:
        stage.check(check["name"], check["ok"], check["detail"])
    stage.finalize()
