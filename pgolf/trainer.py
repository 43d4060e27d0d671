"""The training loop of `pgolf train`: the challenge's train_gpt.py loop, plus budget-aware schedules, EMA,
QAT, the depth-recurrence switch, DDP with gradient accumulation, periodic/signal checkpoints and exact resume.

Timing follows the challenge: compile warm-up steps run first and are undone (model, optimizer and data are
restored), and the wallclock cap counts only training steps (validation and checkpoint writes pause the
clock). Under torchrun, ranks agree on the clock once per step (the max of their elapsed times), so every rank
takes the same schedule values and stops at the same step.

Depth recurrence (model num_loops > 0) with enable_looping_at > 0 trains without the loops (GPT.looping False)
until that fraction of the budget, as the 04-16 record does. The exported model always loops (GPT builds with
looping on, and that is what quantize, eval and the submission run), so a run whose budget ends before the switch
turns the loops on for its final validation, which then scores the exported model. With num_loops 0 the setting
does nothing.
"""

import copy
import dataclasses
import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch.nn.parallel import DistributedDataParallel

from pgolf.artifacts import atomic_write_bytes, safetensors_bytes
from pgolf.dist import Distributed
from pgolf.errors import InvalidInput, PgolfError, UsageError, named
from pgolf.gptq import collect_hessians
from pgolf.model import (
    GPT,
    CastedLinear,
    ModelConfig,
    attention_kernels,
    param_groups,
    pick_attention_kernel,
    set_qat_enabled,
    set_qat_plan,
)
from pgolf.optim import ORTHOGONALIZERS, Muon, build_optimizers
from pgolf.train_config import TrainConfig
from pgolf.train_loader import TrainLoader

RESUME_FILE = "resume.safetensors"
RESUME_FORMAT = "pgolf-train-resume"
# Settings a resumed run may change: they do not alter the weights it produces.
RESUME_FREE_FIELDS = ("val_every", "log_every", "checkpoint_every", "compile", "warmup_steps", "attention_kernel")
# log_every 0: about this many train lines per run (plus the first and the last step).
LINES_PER_RUN = 20


class TrainingInterrupted(PgolfError):
    """SIGTERM/SIGINT stopped training after a resumable checkpoint was written (exit 128 + signal)."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         f"resumable checkpoint saved (continue with --resume)")
        self.exit_code = 128 + signum
        self.step = step


class Schedule:
    """Learning-rate scale, Muon momentum, EMA, QAT and looping switches as functions of (step, train ms).

    Fraction-of-budget settings use progress = max(step / iterations, train_ms / wallclock_ms); the
    challenge's settings (warmdown_iters, muon_momentum_warmup_steps) are used when the fractions are 0.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        # The GPTQ reserve comes off the top: calibration after the last step stays inside wallclock_seconds.
        self.wallclock_ms = 1000.0 * (config.wallclock_seconds - config.gptq_reserve_seconds) \
            if config.wallclock_seconds else 0.0

    def progress(self, step: int, elapsed_ms: float) -> float:
        progress = step / self.config.iterations
        if self.wallclock_ms > 0:
            progress = max(progress, elapsed_ms / self.wallclock_ms)
        return min(progress, 1.0)

    def lr_scale(self, step: int, elapsed_ms: float) -> float:
        """The lr multiplier: 1, then the warm-down's linear fall, never below min_lr (the 04-16 record's
        max((1 - progress) / warmdown_frac, min_lr); the same floor holds under warmdown_iters)."""
        return max(self._warmdown_scale(step, elapsed_ms), self.config.min_lr)

    def _warmdown_scale(self, step: int, elapsed_ms: float) -> float:
        config = self.config
        if config.warmdown_frac > 0:
            return min(1.0, max(0.0, (1.0 - self.progress(step, elapsed_ms)) / config.warmdown_frac))
        if config.warmdown_iters <= 0:
            return 1.0
        if self.wallclock_ms <= 0:
            remaining_steps = config.iterations - step
            return min(1.0, max(0.0, remaining_steps / config.warmdown_iters))
        # The challenge's wallclock-aware warm-down: the last warmdown_iters steps at the measured ms/step.
        warmdown_ms = config.warmdown_iters * elapsed_ms / max(step, 1)
        remaining_ms = max(self.wallclock_ms - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0

    def muon_momentum(self, step: int, elapsed_ms: float) -> float:
        config = self.config
        if config.muon_momentum_warmup_frac > 0:
            done = min(self.progress(step, elapsed_ms) / config.muon_momentum_warmup_frac, 1.0)
        elif config.muon_momentum_warmup_steps > 0:
            done = min(step / config.muon_momentum_warmup_steps, 1.0)
        else:
            done = 1.0
        return (1.0 - done) * config.muon_momentum_warmup_start + done * config.muon_momentum

    def ema_on(self, step: int, elapsed_ms: float) -> bool:
        return self.config.ema_decay > 0 and self.progress(step, elapsed_ms) >= self.config.ema_start_frac

    def qat_on(self, step: int, elapsed_ms: float) -> bool:
        return self.config.qat_bits > 0 and self.progress(step, elapsed_ms) >= self.config.qat_start_frac

    def looping_on(self, step: int, elapsed_ms: float) -> bool:
        """Whether depth recurrence runs its loops in this step (the trainer asks only when the model loops)."""
        return self.progress(step, elapsed_ms) >= self.config.enable_looping_at

    def log_due(self, step: int, elapsed_ms: float, previous_ms: float) -> bool:
        """Whether `step` (trained from `previous_ms` to `elapsed_ms`) gets a train line: every log_every steps, or
        with log_every 0 each time progress passes another 1/LINES_PER_RUN of the budget (steps or wallclock)."""
        if self.config.log_every:
            return step % self.config.log_every == 0
        return (int(LINES_PER_RUN * self.progress(step, elapsed_ms))
                > int(LINES_PER_RUN * self.progress(step - 1, previous_ms)))


class WeightEMA:
    """fp32 exponential moving average of a model's floating-point state; starts as a copy of the weights."""

    def __init__(self, decay: float):
        self.decay = decay
        self.tensors: dict[str, torch.Tensor] | None = None
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        state = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
        if self.tensors is None:
            self.tensors = {name: t.detach().float().clone() for name, t in state.items()}
        else:
            current = [t.float() for t in state.values()]
            torch._foreach_lerp_(list(self.tensors.values()), current, 1.0 - self.decay)
        self.updates += 1


def qat_plan(model: GPT, config: TrainConfig) -> dict[str, int]:
    """Fake-quant bits per block (Muon) matrix: qat_mlp_bits for MLP layers if set, else qat_bits."""
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear) and not module.control and name != "lm_head":
            is_mlp = ".mlp." in name
            plan[name] = config.qat_mlp_bits if is_mlp and config.qat_mlp_bits else config.qat_bits
    return plan


def place_model(model: GPT, device: torch.device) -> GPT:
    """On CUDA, the challenge's dtypes (bf16_training_dtypes); on CPU everything stays fp32."""
    model = model.to(device)
    return bf16_training_dtypes(model) if device.type == "cuda" else model


def bf16_training_dtypes(model: GPT) -> GPT:
    """As the challenge: bf16 embeddings (hence bf16 activations), fp32 CastedLinear weights (cast at matmul
    time) and fp32 scalar-group parameters (vectors, gains, mixes, skip weights), which Adam needs in full
    precision."""
    model.bfloat16()
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    for param in param_groups(model)["scalar"]:
        param.data = param.data.float()
    return model


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "off":
        return model
    return torch.compile(model, backend=mode, dynamic=False, fullgraph=True)


@torch.no_grad()
def flat_val(model, val_tokens: torch.Tensor, seq_len: int, batch_seqs: int, byte_tables,
             dist_info: Distributed, autocast) -> dict:
    """Exact val loss and bpb over the val split's non-overlapping seq_len windows (the challenge's protocol:
    the tail shorter than one window is not scored). bpb = sum NLL / (ln 2 * sum bytes), bytes from the
    pgolf.bpb tables.

    `val_tokens` is the whole split (CPU int tensor); each rank scores its share and the sums are all-reduced.
    """
    device = dist_info.device
    base_bytes, has_space, is_boundary = byte_tables
    total_seqs = (len(val_tokens) - 1) // seq_len
    first = total_seqs * dist_info.rank // dist_info.world_size
    last = total_seqs * (dist_info.rank + 1) // dist_info.world_size
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # nll, tokens, bytes
    for start in range(first, last, batch_seqs):
        end = min(start + batch_seqs, last)
        window = val_tokens[start * seq_len : end * seq_len + 1].to(device, non_blocking=True).long()
        x, y = window[:-1].view(-1, seq_len), window[1:].view(-1, seq_len)
        with autocast():
            loss = model(x, y)
        sums[0] += loss.double() * y.numel()
        sums[1] += y.numel()
        sums[2] += (base_bytes[y] + (has_space[y] & ~is_boundary[x])).sum().double()
    if dist_info.world_size > 1:
        dist.all_reduce(sums)
    nll, tokens, byte_count = sums.tolist()
    return {"val_loss": nll / tokens, "val_bpb": nll / (math.log(2) * byte_count),
            "val_tokens": int(tokens), "val_bytes": int(byte_count)}


class TrainLog:
    """train.log (human lines) and train_log.jsonl (one JSON record per line), appended by rank 0 only.

    On resume the JSONL keeps only what happened before the checkpoint, so nothing is listed twice.
    """

    def __init__(self, directory: Path, enabled: bool, on_line=None, on_record=None):
        self.human = Path(directory) / "train.log"
        self.jsonl = Path(directory) / "train_log.jsonl"
        self.enabled, self.on_line, self.on_record = enabled, on_line, on_record

    def truncate_after(self, step: int) -> None:
        """Keep train records up to `step` and other records before it (the checkpoint at `step` is written
        before that step's validation and loop switch, which the resumed run repeats); drop a line cut short by
        a crash."""
        if not self.enabled or not self.jsonl.is_file():
            return
        kept = []
        for line in self.jsonl.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] < step or (record["step"] == step and record["event"] == "train"):
                kept.append(line)
        atomic_write_bytes(self.jsonl, "".join(line + "\n" for line in kept).encode())

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            with open(self.human, "a") as f:
                f.write(text + "\n")
        except OSError as e:
            raise named(e, self.human) from None
        if self.on_line:
            self.on_line(text)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as e:
            raise named(e, self.jsonl) from None
        if self.on_record:
            self.on_record(record)


class StopSignal:
    """Records SIGTERM/SIGINT so the loop stops at the next step boundary; a second signal interrupts now."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False


class Trainer:
    """A model, its optimizers and train stream on one rank, with the state that a resume restores."""

    # torch.profiler labels of a train step's two phases (benchmarks/train_step.py --profile reads them).
    PROFILE_LABELS = ("forward_backward", "optimizer")

    def __init__(self, model_config: ModelConfig, config: TrainConfig, train_paths: list,
                 dist_info: Distributed, data_fingerprint: str | None = None):
        """`data_fingerprint` (pgolf.shards.dataset_fingerprint) goes into resume checkpoints; a resume on other
        data is refused."""
        self.model_config, self.config, self.dist = model_config, config, dist_info
        self.data_fingerprint = data_fingerprint
        self.device = dist_info.device
        self.accumulation = config.accumulation_steps(dist_info.world_size)
        self.train_paths = list(train_paths)
        torch.manual_seed(config.seed)
        model = GPT(model_config)
        if config.qat_bits:
            set_qat_plan(model, qat_plan(model, config))
        self.model = place_model(model, self.device)
        # the kernel this run forces ("torch": none); chosen before any compile, which traces it
        self.attention_kernel = pick_attention_kernel("attention_kernel", config.attention_kernel, model_config,
                                                      self.device, masked=config.isolate_documents)
        self.compiled = compile_model(self.model, config.compile)
        self.ddp = None
        if dist_info.world_size > 1:
            device_ids = [dist_info.local_rank] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.compiled, device_ids=device_ids, broadcast_buffers=False)
        orthogonalize = ORTHOGONALIZERS[config.muon_ns_coefficients]
        if self.device.type == "cuda" and config.compile != "off":
            orthogonalize = torch.compile(orthogonalize, backend=config.compile, dynamic=False)
        self.optimizers = build_optimizers(self.model, config, fused=self.device.type == "cuda",
                                           orthogonalize=orthogonalize)
        self.muon = [opt for opt in self.optimizers if isinstance(opt, Muon)]
        self.schedule = Schedule(config)
        self.ema = WeightEMA(config.ema_decay) if config.ema_decay > 0 else None
        self.step, self.train_ms, self.qat_active = 0, 0.0, False
        # Train records not yet in the JSONL, each with its loss still on the device (see write_step_records).
        self.unwritten: list[tuple[dict, torch.Tensor]] = []
        # Depth recurrence: loops off until enable_looping_at; the step they came on (None: not yet, or no loops).
        self.looping_enabled_step = None
        if model_config.num_loops:
            self.model.looping = config.enable_looping_at == 0
            self.looping_enabled_step = 0 if self.model.looping else None
        self.loader = self._loader((0, 0))
        self.hessians = None  # GPTQ Hessians of the exported weights (gptq_calibration_batches > 0), after run
        self.calibration_batches = 0  # micro-batches of the train stream read by calibration

    @property
    def param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _loader(self, position: tuple[int, int]) -> TrainLoader:
        return TrainLoader(self.train_paths, self.model_config.vocab_size, self.config.seq_len,
                           self.config.micro_tokens(self.dist.world_size), self.dist.rank, self.dist.world_size,
                           self.device, position)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, lr_scale: float, momentum: float) -> torch.Tensor:
        """One optimizer step over batch_tokens (accumulated micro-batches); returns this rank's mean loss."""
        model = self.ddp or self.compiled
        total = torch.zeros((), device=self.device)
        with torch.profiler.record_function(self.PROFILE_LABELS[0]), \
                attention_kernels(self.attention_kernel, self.device):
            for micro in range(self.accumulation):
                x, y = self.loader.next_batch()
                last_micro = micro == self.accumulation - 1
                with nullcontext() if self.ddp is None or last_micro else self.ddp.no_sync():
                    with self.autocast():
                        loss = model(x, y, isolate_documents=self.config.isolate_documents)
                    (loss / self.accumulation).backward()
                total += loss.detach()
        with torch.profiler.record_function(self.PROFILE_LABELS[1]):
            self._optimizer_step(lr_scale, momentum)
        return total / self.accumulation

    def _optimizer_step(self, lr_scale: float, momentum: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        for opt in self.muon:
            for group in opt.param_groups:
                group["momentum"] = momentum
        if self.config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def warmup_graphs(self) -> tuple[bool, ...]:
        """The GPT.looping values the rest of the run trains with: both while the loop switch is still ahead."""
        if not self.model.looping and self.config.enable_looping_at < 1.0:
            return (False, True)
        return (self.model.looping,)

    def warmup(self) -> None:
        """Compile and warm up on real steps, then restore the model, optimizers and data position.

        A run that will switch depth recurrence on later warms both graphs, warmup_steps each (loops off, then
        on, as the 04-16 record does), so the switch costs no compile inside the timed loop. (At
        enable_looping_at 1 the loops come on only for the final validation, which runs the plain module.)"""
        if self.config.warmup_steps <= 0:
            return
        model_state = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        position, looping = self.loader.position, self.model.looping
        for graph in self.warmup_graphs():
            self.model.looping = graph
            for _ in range(self.config.warmup_steps):
                self.train_step(1.0, self.schedule.muon_momentum(0, 0.0))
        self.model.looping = looping
        self.model.load_state_dict(model_state)
        for opt, state in zip(self.optimizers, optimizer_states, strict=True):
            opt.load_state_dict(state)
        self.loader = self._loader(position)
        self.synchronize()

    def set_qat(self, on: bool) -> None:
        if on != self.qat_active:
            set_qat_enabled(self.model, on)
            self.qat_active = on

    def enable_looping(self, log: TrainLog, progress: float, why: str) -> None:
        """Turn depth recurrence's loops on from the next step (GPT.looping: torch.compile guards on it, so the
        compiled module switches to the looped graph that warmup() built)."""
        self.write_step_records(log)
        self.model.looping = True
        self.looping_enabled_step = self.step
        order = " ".join(map(str, self.model.layout.execution))
        log.record({"event": "looping", "step": self.step, "progress": progress, "train_ms": round(self.train_ms, 1)})
        log.line(f"step {self.step}: depth recurrence on at progress {progress:.3f} ({why}); blocks run {order}")

    def _agree(self, elapsed_ms: float, signaled: bool) -> tuple[float, bool]:
        """Every rank takes the largest elapsed time and any rank's stop signal (one small all-reduce)."""
        if self.dist.world_size == 1:
            return elapsed_ms, signaled
        flags = torch.tensor([elapsed_ms, float(signaled)], device=self.device, dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags[0].item(), flags[1].item() > 0

    def write_step_records(self, log: TrainLog, window: dict | None = None) -> dict | None:
        """Write the train records held since the last write, their losses averaged over ranks in one transfer:
        the host waits for the device only here (log lines, validation, checkpoints), never every step. `window`
        (ms/step and tokens/s since the last line) goes on the last record, which is returned. Every rank calls
        it at the same steps (the all-reduce)."""
        if not self.unwritten:
            return None
        losses = torch.stack([loss for _, loss in self.unwritten])
        if self.dist.world_size > 1:
            dist.all_reduce(losses)
            losses /= self.dist.world_size
        records = [{**record, "loss": loss}
                   for (record, _), loss in zip(self.unwritten, losses.tolist(), strict=True)]
        records[-1] |= window or {}
        self.unwritten = []
        for record in records:
            log.record(record)
        return records[-1]

    def validate(self, val_tokens, byte_tables) -> dict:
        """Validation runs the plain module: through the compiled one, torch.compile would build a second,
        forward-only graph, which cost more on the H100 than the val pass itself (benchmarks/train_step.py --val)."""
        batch_seqs = max(self.config.micro_tokens(self.dist.world_size) // self.config.seq_len, 1)
        return flat_val(self.model, val_tokens, self.config.seq_len, batch_seqs, byte_tables, self.dist,
                        self.autocast)

    # ---- resume state -------------------------------------------------------------------------------------
    def configs_json(self) -> dict:
        """The configs as the resume checkpoint's JSON holds them (tuples become lists), so they compare equal."""
        return json.loads(json.dumps({"model": dataclasses.asdict(self.model_config),
                                      "train": dataclasses.asdict(self.config)}))

    def save_resume(self, path: Path) -> None:
        """Model, EMA, optimizer states, RNG and loop position in one safetensors file, written atomically."""
        tensors = {f"model.{name}": t for name, t in self.model.state_dict().items()}
        if self.ema is not None and self.ema.tensors is not None:
            tensors |= {f"ema.{name}": t for name, t in self.ema.tensors.items()}
        groups = []
        for index, opt in enumerate(self.optimizers):
            state = opt.state_dict()
            for param_id, param_state in state["state"].items():
                for key, value in param_state.items():
                    tensors[f"optim.{index}.{param_id}.{key}"] = value
            groups.append(state["param_groups"])
        tensors["rng.cpu"] = torch.get_rng_state()
        loop = {"step": self.step, "train_ms": self.train_ms, "loader_position": list(self.loader.position),
                "ema_updates": self.ema.updates if self.ema else 0, "optimizer_groups": groups,
                "looping": self.model.looping, "looping_enabled_step": self.looping_enabled_step,
                "world_size": self.dist.world_size, "configs": self.configs_json(),
                "data_fingerprint": self.data_fingerprint}
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        metadata = {"format": RESUME_FORMAT, "loop": json.dumps(loop)}
        atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata=metadata))

    def load_resume(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            loop = json.loads(metadata["loop"]) if metadata.get("format") == RESUME_FORMAT else None
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise InvalidInput(f"{path}: not a readable resume checkpoint ({str(e).splitlines()[0]}); start over "
                               f"without --resume") from None
        if loop is None or not isinstance(loop, dict):
            raise InvalidInput(f"{path}: not a pgolf train resume checkpoint")
        if loop.get("data_fingerprint") != self.data_fingerprint:
            raise InvalidInput(f"{path}: was written training on other data (its fingerprint differs from this "
                               f"DATA_DIR's); resume with the same data, or start over with --force")
        self._check_same_configs(path, loop["configs"])
        self.model.load_state_dict({k.removeprefix("model."): t for k, t in tensors.items()
                                    if k.startswith("model.")})
        ema = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
        if self.ema is not None and ema:
            self.ema.tensors = {name: t.to(self.device) for name, t in ema.items()}
            self.ema.updates = loop["ema_updates"]
        for index, (opt, groups) in enumerate(zip(self.optimizers, loop["optimizer_groups"], strict=True)):
            prefix = f"optim.{index}."
            state: dict[int, dict] = {}
            for name, t in tensors.items():
                if name.startswith(prefix):
                    param_id, key = name.removeprefix(prefix).split(".", 1)
                    state.setdefault(int(param_id), {})[key] = t
            for group in groups:
                if "betas" in group:
                    group["betas"] = tuple(group["betas"])
            opt.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.cpu"])
        self.step, self.train_ms = loop["step"], loop["train_ms"]
        # Checkpoints from before the looping switch existed were written by models that always looped.
        self.model.looping = loop.get("looping", True)
        self.looping_enabled_step = loop.get("looping_enabled_step", 0 if self.model_config.num_loops else None)
        self.loader = self._loader(tuple(loop["loader_position"]))

    def _check_same_configs(self, path: Path, saved: dict) -> None:
        """A field the checkpoint's pgolf did not have yet counts as its default (what that pgolf ran)."""
        current = json.loads(json.dumps(self.configs_json()))  # as saved: a tuple field reads back as a list
        defaults = json.loads(json.dumps({"model": dataclasses.asdict(ModelConfig()),
                                          "train": dataclasses.asdict(TrainConfig())}))
        for table in ("model", "train"):
            for name, value in current[table].items():
                was = saved[table].get(name, defaults[table][name])
                if was != value and name not in RESUME_FREE_FIELDS:
                    raise UsageError(f"{path}: was written with {table} {name} = {was!r}, "
                                     f"this run has {value!r} (resume with the same settings)")

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self, val_tokens: torch.Tensor, byte_tables, log: TrainLog, resume_path: Path, stop: StopSignal,
            on_step=None) -> dict:
        """Train until iterations, the wallclock cap or a stop signal; validate periodically and at the end.

        `resume_path` receives the periodic checkpoint (rank 0). Raises TrainingInterrupted after a signal.
        Returns the run's metrics; the weights are in self.model (master) and self.ema.
        """
        config, schedule = self.config, self.schedule
        wallclock_ms = schedule.wallclock_ms
        tokens_per_step = config.batch_tokens
        start_step, last_val_step, final_val = self.step, None, None
        window_step, window_ms = self.step, self.train_ms
        elapsed_ms, stop_reason = self.train_ms, None
        self.synchronize()
        clock = time.perf_counter()

        def pause() -> None:
            nonlocal clock
            self.synchronize()
            self.train_ms += 1000.0 * (time.perf_counter() - clock)

        def unpause() -> None:
            nonlocal clock
            self.synchronize()
            clock = time.perf_counter()

        while True:
            if self.step >= config.iterations:
                stop_reason = stop_reason or "iterations"
            elif wallclock_ms > 0 and elapsed_ms >= wallclock_ms:
                stop_reason = stop_reason or "wallclock"
            if stop_reason is not None and not self.model.looping:  # the final validation scores the export
                self.enable_looping(log, schedule.progress(self.step, elapsed_ms), "the budget ended first")
            validate = stop_reason is not None or (
                config.val_every > 0 and self.step % config.val_every == 0 and self.step > 0)
            if validate and last_val_step != self.step:
                pause()
                self.write_step_records(log)
                final_val = self.validate(val_tokens, byte_tables)
                last_val_step = self.step
                log.record({"event": "val", "step": self.step, "train_ms": round(self.train_ms, 1),
                            **final_val})
                log.line(f"step {self.step}: val_loss {final_val['val_loss']:.4f} "
                         f"val_bpb {final_val['val_bpb']:.4f} train_time {self.train_ms / 1000:.1f}s")
                unpause()
            if stop_reason is not None:
                break

            lr_scale = schedule.lr_scale(self.step, elapsed_ms)
            momentum = schedule.muon_momentum(self.step, elapsed_ms)
            self.set_qat(schedule.qat_on(self.step, elapsed_ms))
            if not self.model.looping and schedule.looping_on(self.step, elapsed_ms):
                self.enable_looping(log, schedule.progress(self.step, elapsed_ms), "enable_looping_at")
            loss = self.train_step(lr_scale, momentum)
            self.step += 1
            if self.ema is not None and schedule.ema_on(self.step, elapsed_ms):
                self.ema.update(self.model)

            local_ms = self.train_ms + 1000.0 * (time.perf_counter() - clock)
            previous_ms = elapsed_ms
            elapsed_ms, signaled = self._agree(local_ms, stop.signum is not None)
            self.train_ms, clock = elapsed_ms, time.perf_counter()
            if on_step:
                on_step(self.step, elapsed_ms)

            record = {"event": "train", "step": self.step, "lr_scale": lr_scale,
                      "matrix_lr": config.matrix_lr * lr_scale, "momentum": momentum,
                      "train_ms": round(elapsed_ms, 1),
                      "qat": self.qat_active, "ema": bool(self.ema and self.ema.tensors is not None)}
            if self.model_config.num_loops:
                record["looping"] = self.model.looping
            self.unwritten.append((record, loss.detach()))
            last_step = self.step >= config.iterations or (wallclock_ms > 0 and elapsed_ms >= wallclock_ms)
            if (self.step == start_step + 1 or last_step or signaled
                    or schedule.log_due(self.step, elapsed_ms, previous_ms)):
                steps = self.step - window_step
                window_s = max(elapsed_ms - window_ms, 1e-9) / 1000.0
                window = {"ms_per_step": 1000.0 * window_s / max(steps, 1),
                          "tokens_per_s": steps * tokens_per_step / window_s}
                record = self.write_step_records(log, window)
                log.line(f"step {self.step}/{config.iterations}: loss {record['loss']:.4f} lr x{lr_scale:.3f} "
                         f"{record['ms_per_step']:.1f} ms/step {record['tokens_per_s']:,.0f} tok/s "
                         f"train_time {elapsed_ms / 1000:.1f}s")
                window_step, window_ms = self.step, elapsed_ms

            if signaled:
                pause()
                self._write_resume(resume_path)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.step)
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and not last_step:
                pause()
                self.write_step_records(log)  # a run resumed from this checkpoint goes on from its records
                self._write_resume(resume_path)
                unpause()

        trained_steps = self.step
        result = {"steps": trained_steps, "stop_reason": stop_reason,
                  "tokens_seen": trained_steps * tokens_per_step,
                  "train_seconds": self.train_ms / 1000.0,
                  "ms_per_step": self.train_ms / max(trained_steps, 1), "param_count": self.param_count,
                  "world_size": self.dist.world_size, "accumulation_steps": self.accumulation,
                  "master": final_val, "qat_active": self.qat_active}
        if self.model_config.num_loops:
            result["looping_enabled_step"] = self.looping_enabled_step
        if self.ema is not None and self.ema.tensors is not None:
            result["ema_updates"] = self.ema.updates
            result["ema"] = self._evaluate_ema(val_tokens, byte_tables)
        return result

    def _write_resume(self, path: Path) -> None:
        if self.dist.is_main:
            self.save_resume(path)
        if self.dist.world_size > 1:
            dist.barrier()

    def _evaluate_ema(self, val_tokens, byte_tables) -> dict:
        """Val metrics of the EMA weights; the model holds master weights again afterwards."""
        master = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema_state())
        metrics = self.validate(val_tokens, byte_tables)
        self.model.load_state_dict(master)
        return metrics

    @torch.no_grad()
    def gptq_hessians(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GPTQ Hessians (pgolf.gptq.collect_hessians: every linear layer's inputs, and the final hidden states
        for a tied head) of the weights `state`, from the next gptq_calibration_batches micro-batches of this
        rank's train stream, averaged over ranks; fp32 on the CPU. The model holds its weights again after."""
        kept = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        self.model.load_state_dict(state)
        modules = dict(self.model.named_modules())
        linear = [f"{name}.weight" for name, module in modules.items() if isinstance(module, torch.nn.Linear)]
        head = "tok_emb.weight" if self.model.lm_head is None else None
        batches = [self.loader.next_batch() for _ in range(self.config.gptq_calibration_batches)]
        self.calibration_batches += len(batches)
        with self.autocast():
            hessians = collect_hessians(self.model, linear, batches, head)
        self.model.load_state_dict(kept)
        for hessian in hessians.values():
            if self.dist.world_size > 1:
                dist.all_reduce(hessian)
                hessian /= self.dist.world_size
        return {name: hessian.float().cpu() for name, hessian in hessians.items()}

    def master_state(self) -> dict[str, torch.Tensor]:
        """fp32 CPU copy of the master weights."""
        return {name: t.detach().float().cpu() for name, t in self.model.state_dict().items()}

    def ema_state(self) -> dict[str, torch.Tensor]:
        """fp32 CPU copy of the EMA weights (non-float state from the model)."""
        state = self.master_state()
        return state | {name: t.detach().cpu() for name, t in self.ema.tensors.items()}

    def train_tokens_read(self) -> int:
        """Tokens taken from the train stream so far (each micro-batch span has one extra target token)."""
        span = self.config.micro_tokens(self.dist.world_size) + 1
        return (self.step * self.accumulation + self.calibration_batches) * self.dist.world_size * span
