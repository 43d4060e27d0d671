"""TrainConfig, and resolving a (ModelConfig, TrainConfig) pair from a preset, a config file, env and flags.

Presets (pgolf/presets/train/<name>.toml) and `--config` files hold a [model] table (ModelConfig fields) and
a [train] table (TrainConfig fields). The challenge's upper-case env names (NUM_LAYERS, ITERATIONS, ...) are
accepted through MODEL_ALIASES and TRAIN_ALIASES, so its shell scripts keep working.

Schedules come in two kinds. The challenge's: momentum warm-up over `muon_momentum_warmup_steps` steps, and a
warm-down of `warmdown_iters` steps which, under a wallclock cap, starts when the remaining time falls below
warmdown_iters x the measured ms/step. Or fractions of the budget (`*_frac` > 0): progress is the larger of
step / iterations and train time / wallclock, so a preset tuned for one budget keeps its shape on another.
`min_lr` floors the lr multiplier of either warm-down; `enable_looping_at` (depth recurrence) is a fraction of
the same progress.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pgolf.config import PRESETS, load_preset, preset_names, read_toml, resolve
from pgolf.errors import UsageError
from pgolf.model import ATTENTION_KERNELS, ModelConfig
from pgolf.optim import ORTHOGONALIZERS, POLAR_EXPRESS_COEFFS

TRAIN_PRESET_KIND = "train"
TRAIN_CONFIG_TABLES = ("model", "train")
COMPILE_MODES = ("inductor", "aot_eager", "off")
MAX_SEED = 2**63 - 1

# The challenge train_gpt.py's env names -> config fields.
MODEL_ALIASES = {
    "VOCAB_SIZE": "vocab_size",
    "NUM_LAYERS": "num_layers",
    "MODEL_DIM": "model_dim",
    "NUM_HEADS": "num_heads",
    "NUM_KV_HEADS": "num_kv_heads",
    "MLP_MULT": "mlp_mult",
    "TIE_EMBEDDINGS": "tie_embeddings",
    "TIED_EMBED_INIT_STD": "tied_embed_init_std",
    "ROPE_BASE": "rope_base",
    "QK_GAIN_INIT": "qk_gain_init",
    "LOGIT_SOFTCAP": "logit_softcap",
    "XSA_LAST_N": "xsa_last_n",
    "BIGRAM_VOCAB_SIZE": "bigram_buckets",
    "BIGRAM_DIM": "bigram_dim",
    # The 03-22 and 04-16 records' names for techniques that are one ModelConfig field each (pgolf import
    # translates the rest: SMEAR_GATE/SMEAR_GATE_WIDTH, GATE_ATTN_OUT/GATE_WIDTH/GATE_ATTN_SRC, VE_ENABLED/VE_LAYERS).
    "ROPE_DIMS": "rope_dims",
    "LN_SCALE": "ln_scale",
    "SKIP_GATES_ENABLED": "skip_gates",
    "NUM_LOOPS": "num_loops",
    "LOOP_START": "loop_start",
    "LOOP_END": "loop_end",
    "PARALLEL_START_LAYER": "parallel_start_layer",
    "PARALLEL_FINAL_LANE": "parallel_final_lane",
    "VE_DIM": "value_embed_dim",
}
TRAIN_ALIASES = {
    "ITERATIONS": "iterations",
    "MAX_WALLCLOCK_SECONDS": "wallclock_seconds",
    "TRAIN_BATCH_TOKENS": "batch_tokens",
    "TRAIN_SEQ_LEN": "seq_len",
    "WARMUP_STEPS": "warmup_steps",
    "WARMDOWN_ITERS": "warmdown_iters",
    "MATRIX_LR": "matrix_lr",
    "SCALAR_LR": "scalar_lr",
    "TIED_EMBED_LR": "tied_embed_lr",
    "EMBED_LR": "embed_lr",
    "HEAD_LR": "head_lr",
    "MUON_MOMENTUM": "muon_momentum",
    "MUON_MOMENTUM_WARMUP_START": "muon_momentum_warmup_start",
    "MUON_MOMENTUM_WARMUP_STEPS": "muon_momentum_warmup_steps",
    "MUON_BACKEND_STEPS": "muon_backend_steps",
    "WEIGHT_DECAY": "muon_weight_decay",
    # The 04-16 record's names.
    "MUON_WD": "muon_weight_decay",
    "MUON_ROW_NORMALIZE": "muon_row_normalize",
    "EMBED_WD": "embed_weight_decay",
    "ADAM_WD": "scalar_weight_decay",
    "MIN_LR": "min_lr",
    "WARMDOWN_FRAC": "warmdown_frac",
    "ENABLE_LOOPING_AT": "enable_looping_at",
    "BETA1": "adam_beta1",
    "BETA2": "adam_beta2",
    "ADAM_EPS": "adam_eps",
    "GRAD_CLIP_NORM": "grad_clip_norm",
    "EMA_DECAY": "ema_decay",
    "SEED": "seed",
    "VAL_LOSS_EVERY": "val_every",
    "TRAIN_LOG_EVERY": "log_every",
    "GPTQ_CALIBRATION_BATCHES": "gptq_calibration_batches",
    "GPTQ_RESERVE_SECONDS": "gptq_reserve_seconds",
}


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 20000  # optimizer steps at most
    wallclock_seconds: float = 600.0  # training-time cap (warm-up, val, checkpoints not counted); 0 = none
    batch_tokens: int = 524288  # tokens per optimizer step, all ranks together (same at any world size)
    seq_len: int = 1024  # tokens per training sequence
    isolate_documents: bool = False  # training attention never crosses a BOS (records 04-10, 04-16); eval stays causal
    micro_batch_tokens: int = 0  # max tokens per rank per forward/backward (capped at a rank's share); 0 = batch / 8
    warmup_steps: int = 20  # compile warm-up steps, then model, optimizer and data are restored (not timed)
    warmdown_iters: int = 1200  # challenge warm-down length in steps (wallclock-aware under a cap); 0 = none
    warmdown_frac: float = 0.0  # if > 0: lr falls linearly to 0 over this last fraction of the budget instead
    matrix_lr: float = 0.04  # Muon learning rate of block matrices
    scalar_lr: float = 0.04  # Adam learning rate of vectors, gains and small gate matrices
    tied_embed_lr: float = 0.05  # Adam learning rate of the token embedding when tied to the head
    embed_lr: float = 0.6  # Adam learning rate of the token embedding when untied
    head_lr: float = 0.008  # Adam learning rate of the untied output head
    muon_momentum: float = 0.95  # Muon momentum after warm-up
    muon_momentum_warmup_start: float = 0.85  # Muon momentum at step 0
    muon_momentum_warmup_steps: int = 500  # steps of linear momentum warm-up (challenge mode)
    muon_momentum_warmup_frac: float = 0.0  # if > 0: momentum warm-up over this fraction of the budget
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_weight_decay: float = 0.0  # decoupled weight decay of Muon matrices (p *= 1 - lr * wd)
    muon_row_normalize: bool = False  # MuonEq-R: divide each Muon update by its row L2 norms before Newton-Schulz
    muon_ns_coefficients: str = "standard"  # Newton-Schulz: standard (3.4445, -4.775, 2.0315) | polar-express
    embed_weight_decay: float = 0.0  # AdamW decoupled weight decay of the embedding group; 0 = Adam
    scalar_weight_decay: float = 0.0  # AdamW decoupled weight decay of the scalar group; 0 = Adam
    min_lr: float = 0.0  # floor of the lr multiplier during warm-down (warmdown_frac or warmdown_iters)
    enable_looping_at: float = 0.0  # depth recurrence (num_loops > 0) runs its loops from this budget fraction on
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    grad_clip_norm: float = 0.0  # clip the global gradient norm to this; 0 = off
    ema_decay: float = 0.0  # EMA of the weights (exported as model.safetensors); 0 = off
    ema_start_frac: float = 0.0  # the EMA starts from the current weights at this fraction of the budget
    qat_bits: int = 0  # STE fake-quant bits of block matrices (5-8); 0 = no QAT
    qat_mlp_bits: int = 0  # bits of MLP matrices (e.g. 5 with qat_bits 6); 0 = qat_bits
    qat_start_frac: float = 0.0  # QAT switches on at this fraction of the budget
    gptq_calibration_batches: int = 0  # after training, GPTQ Hessians of the exported weights from this many
    # micro-batches of each rank's train stream, saved as gptq_hessians.safetensors (quantize needs no --data)
    gptq_reserve_seconds: float = 0.0  # training stops this long before wallclock_seconds so calibration fits
    seed: int = 1337  # seed of the model init (the data order is fixed)
    val_every: int = 1000  # validate every N steps (and at the end); 0 = only at the end
    log_every: int = 0  # a train line every N steps, and the first and last; 0 = about 20 lines per run
    checkpoint_every: int = 500  # write the resumable checkpoint every N steps; 0 = only on SIGTERM/SIGINT
    compile: str = "inductor"  # torch.compile backend: inductor | aot_eager | off
    attention_kernel: str = "auto"  # training's SDPA kernel on CUDA: auto (cuDNN where it runs the model's causal
    # attention, without isolate_documents; else torch's pick) | torch (torch's pick: FA2 in training's profile) |
    # flash | cudnn | efficient; the same attention, other kernels (model.pick_attention_kernel says what measured)

    def __post_init__(self):
        def need(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(f"{field} = {getattr(self, field)!r}: must be {allowed}")

        need(self.iterations >= 1, "iterations", ">= 1")
        need(self.wallclock_seconds >= 0, "wallclock_seconds", ">= 0 (0 = no cap)")
        need(self.seq_len >= 1, "seq_len", ">= 1")
        need(self.batch_tokens >= self.seq_len and self.batch_tokens % self.seq_len == 0, "batch_tokens",
             f"a positive multiple of seq_len ({self.seq_len})")
        # A cap, not a size: larger than a rank's share of the batch means one micro-batch per step.
        need(self.micro_batch_tokens >= 0 and self.micro_batch_tokens % self.seq_len == 0, "micro_batch_tokens",
             f"0 (batch_tokens / 8) or a positive multiple of seq_len ({self.seq_len})")
        need(self.micro_batch_tokens != 0 or self.batch_tokens % (8 * self.seq_len) == 0, "batch_tokens",
             f"a multiple of 8 * seq_len ({8 * self.seq_len}) when micro_batch_tokens is 0")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(self.warmdown_iters >= 0, "warmdown_iters", ">= 0")
        for name in ("warmdown_frac", "muon_momentum_warmup_frac", "ema_start_frac", "qat_start_frac"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]")
        for name in ("matrix_lr", "scalar_lr", "tied_embed_lr", "embed_lr", "head_lr"):
            need(getattr(self, name) >= 0, name, ">= 0")
        for name in ("muon_momentum", "muon_momentum_warmup_start", "adam_beta1", "adam_beta2"):
            need(0.0 <= getattr(self, name) < 1.0, name, "in [0, 1)")
        need(self.muon_momentum_warmup_steps >= 0, "muon_momentum_warmup_steps", ">= 0")
        need(self.muon_backend_steps >= 1, "muon_backend_steps", ">= 1")
        need(self.muon_weight_decay >= 0, "muon_weight_decay", ">= 0")
        need(self.muon_ns_coefficients in ORTHOGONALIZERS, "muon_ns_coefficients",
             f"one of {', '.join(ORTHOGONALIZERS)}")
        need(self.muon_ns_coefficients != "polar-express" or self.muon_backend_steps <= len(POLAR_EXPRESS_COEFFS),
             "muon_backend_steps", f"<= {len(POLAR_EXPRESS_COEFFS)} with polar-express (its published schedule)")
        for name in ("embed_weight_decay", "scalar_weight_decay"):
            need(getattr(self, name) >= 0, name, ">= 0 (0 = Adam)")
        need(0.0 <= self.min_lr <= 1.0, "min_lr", "in [0, 1]")
        need(0.0 <= self.enable_looping_at <= 1.0, "enable_looping_at", "in [0, 1]")
        need(self.adam_eps > 0, "adam_eps", "> 0")
        need(self.grad_clip_norm >= 0, "grad_clip_norm", ">= 0 (0 = off)")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "in [0, 1) (0 = off)")
        need(self.qat_bits == 0 or 5 <= self.qat_bits <= 8, "qat_bits", "0 (off) or 5-8")
        need(self.qat_mlp_bits == 0 or 5 <= self.qat_mlp_bits <= 8, "qat_mlp_bits", "0 (= qat_bits) or 5-8")
        need(self.qat_mlp_bits == 0 or self.qat_bits > 0, "qat_mlp_bits", "0 unless qat_bits is set")
        need(0 <= self.seed <= MAX_SEED, "seed", f"in [0, {MAX_SEED}] (a 64-bit seed)")
        need(self.gptq_calibration_batches >= 0, "gptq_calibration_batches", ">= 0 (0 = none)")
        need(self.gptq_reserve_seconds >= 0, "gptq_reserve_seconds", ">= 0")
        need(self.gptq_reserve_seconds == 0 or self.gptq_calibration_batches > 0, "gptq_reserve_seconds",
             "0 unless gptq_calibration_batches > 0")
        need(self.gptq_reserve_seconds < self.wallclock_seconds or not self.wallclock_seconds,
             "gptq_reserve_seconds", "below wallclock_seconds (unused without a wallclock budget)")
        for name in ("val_every", "log_every", "checkpoint_every"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(self.compile in COMPILE_MODES, "compile", f"one of {', '.join(COMPILE_MODES)}")
        need(self.attention_kernel in ATTENTION_KERNELS, "attention_kernel", f"one of {', '.join(ATTENTION_KERNELS)}")
        need(self.attention_kernel != "flash" or not self.isolate_documents, "attention_kernel",
             "other than flash with isolate_documents (the flash kernel takes no document mask)")

    def micro_tokens(self, world_size: int = 1) -> int:
        """Tokens per rank per forward/backward: micro_batch_tokens (0: batch_tokens / 8, as the challenge), capped
        at one rank's share of the batch, so a preset sized for one GPU also runs unchanged on eight."""
        return min(self.micro_batch_tokens or self.batch_tokens // 8, self.batch_tokens // world_size)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per rank per step; the global batch stays batch_tokens at any world size."""
        per_step = world_size * self.micro_tokens(world_size)
        if self.batch_tokens % per_step:
            raise UsageError(f"batch_tokens {self.batch_tokens} is not a multiple of world size {world_size}"
                             f" x micro_batch_tokens {self.micro_tokens(world_size)}; set --micro-batch-tokens")
        return self.batch_tokens // per_step


def _check_preset_tables(layer: dict, source: str) -> None:
    unknown = sorted(set(layer) - set(TRAIN_CONFIG_TABLES))
    if unknown:
        raise UsageError(f"{source}: unknown table(s) {', '.join(unknown)} (valid: [model], [train])")


def resolve_configs(preset: str | None, config_file: Path | None = None, env=None,
                    model_overrides: dict | None = None, train_overrides: dict | None = None):
    """(ModelConfig, TrainConfig, sources): flags > PGOLF_* / challenge env > --config > preset > defaults.

    The model's max_seq_len is raised to the training seq_len when shorter (it only sizes the RoPE tables).
    """
    if preset:
        _check_preset_tables(load_preset(TRAIN_PRESET_KIND, preset), f"preset {preset}")
    if config_file:
        _check_preset_tables(read_toml(config_file), str(config_file))
    common = dict(kind=TRAIN_PRESET_KIND, preset=preset, config_file=config_file, env=env)
    model_config, model_sources = resolve(ModelConfig, table="model", aliases=MODEL_ALIASES,
                                          overrides=model_overrides, **common)
    train_config, train_sources = resolve(TrainConfig, table="train", aliases=TRAIN_ALIASES,
                                          overrides=train_overrides, **common)
    if model_config.max_seq_len < train_config.seq_len:
        model_config = dataclasses.replace(model_config, max_seq_len=train_config.seq_len)
    sources = {f"model.{k}": v for k, v in model_sources.items()}
    sources |= {f"train.{k}": v for k, v in train_sources.items()}
    return model_config, train_config, sources


def preset_summaries() -> dict[str, str]:
    """Each train preset's name -> the first comment line of its TOML (what it is for)."""
    summaries = {}
    for name in preset_names(TRAIN_PRESET_KIND):
        first = (PRESETS / TRAIN_PRESET_KIND / f"{name}.toml").read_text(errors="replace").splitlines()[:1]
        summaries[name] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return summaries
