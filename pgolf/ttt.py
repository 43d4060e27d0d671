"""Score-first test-time training (TTT) at evaluation, on a copy of the dequantized artifact.

One rule for every mode (C3, C4): the stream's targets (positions 1..N-1) are scored once, chunk by chunk,
with the current weights; only then may weights train on that chunk's targets. sgd / adamw / lora / phased score
in stream order through the eval's `score_chunk`; batched scores document chunks in the records' order
(length-sorted batches) through `score_logits`, each from its own document's earlier tokens only. The last
chunk (of the stream; of each document in batched) is never trained: nothing is left to score after it. Each
score and each update is logged in TTTResult.events, so the compliance check can verify the order. run_ttt
deep-copies the caller's model, so other evaluations in the process keep the artifact's weights, and writes no
file.

Modes
- sgd / adamw: chunked full-model TTT (seed PR #461 / #549 lineage). After scoring a chunk of `chunk_tokens`
  targets, `epochs` passes over it in rows of train_seq_len, `batch_seqs` rows a step, gradient clipping, the
  learning rate cosine-decayed across chunks; the first `freeze_blocks` blocks stay fixed.
- lora: low-rank adapters on the CastedLinear layers named in `lora_targets` (PR #1767 lineage):
  y = W x + (lora_alpha / lora_rank) * B A x, with A ~ U(+-1/sqrt(fan_in)) and B = 0. Documents (split at BOS)
  are taken in order, in chunks of `chunk_tokens`; each chunk except a segment's last trains the adapters for
  `epochs` AdamW steps (weight decay `lora_weight_decay`). A segment is one document (lora_reset document) or
  `lora_batch_docs` documents (batch); at each segment B and the optimizer restart while A is kept (warm
  start, unless lora_warm_start is off). The seeds skip a document's last chunk too: B is reset right after.
- phased: lora plus phased global SGD (PR #1610 / #1626 lineage). When the first prefix_docs * i / phases
  documents have been scored (i = 1..phases), scoring pauses, SGD trains all base weights over every document
  scored so far (the seeds' cumulative prefix; lr cosine-decayed over `phase_chunk_tokens` chunks, adapters
  off), and scoring resumes with fresh adapters. The seeds shrink prefix_docs to the stream's document count
  when it is smaller; that makes early pauses depend on later BOS tokens (a C1 leak), so here a stream with
  fewer documents just gets fewer pauses. No pause comes after the last document.
- batched: the records' TTT (04-10 / 04-16 / 04-27, seed #1790): documents sorted by length in batches of
  `lora_batch_docs`, per-document adapters on q/k/v/O, the MLP and the lm_head, chunks of `chunk_tokens` in
  windows of up to `eval_seq_len`, B reset per batch, A kept with lora_warm_start, optional phased global SGD
  (prefix_docs > 0) in rows that never cross a BOS. Details in its section below; named settings
  pgolf/presets/ttt/record-0416.toml and record-1790.toml (`--ttt-mode record-0416`).
"""

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.errors import ComplianceError, UsageError
from pgolf.model import (
    ATTENTION_KERNELS,
    BOS_ID,
    CastedLinear,
    attention_kernels,
    block_layout,
    require_attention_kernel,
)
from pgolf.train_config import COMPILE_MODES

TTT_MODES = ("sgd", "adamw", "lora", "phased", "batched")
TTT_LORA_RESETS = ("document", "batch")
# Seed values for the fields left as None, per mode.
TTT_MODE_DEFAULTS = {
    "sgd": {"lr": 0.002, "momentum": 0.9, "epochs": 3, "chunk_tokens": 32768},
    "adamw": {"lr": 1e-4, "momentum": 0.9, "epochs": 3, "chunk_tokens": 32768},
    "lora": {"lr": 1e-4, "momentum": 0.0, "epochs": 1, "chunk_tokens": 256},
    "phased": {"lr": 1e-4, "momentum": 0.0, "epochs": 1, "chunk_tokens": 256},
    "batched": {"lr": 1e-4, "momentum": 0.0, "epochs": 1, "chunk_tokens": 48},
}
# The records' doc-batched LoRA adapters (mode batched, below): q/k/v/O projections, the whole MLP, the lm_head.
TTT_BATCHED_TARGETS = ("q", "k", "v", "o", "mlp", "head")
TTT_O_INPUTS = ("input", "attn")  # the O adapter reads the block's normed input (04-16) or the attention output
TTT_ADAM_BETA2 = 0.999
TTT_ADAM_EPS = 1e-10
TTT_LORA_SEED = 0  # adapters start the same on every run
TTT_PROGRESS_SECONDS = 30.0
# A compiled batched forward meets a few shape classes: scoring (no grad) and training, one active document or
# several, a one-position last chunk or longer: up to 8 graphs, each with symbolic sizes.
TTT_COMPILE_GRAPHS = 16


@dataclass(frozen=True)
class TTTConfig:
    mode: str = "sgd"  # sgd | adamw (full model) | lora | phased (lora + global SGD) | batched (the records')
    lr: float | None = None  # learning rate (adapters in lora/phased); None: sgd 0.002, others 1e-4
    epochs: int | None = None  # passes over each scored chunk; None: 3 (sgd, adamw), 1 (lora, phased)
    momentum: float | None = None  # SGD momentum / AdamW beta1; None: 0.9 (sgd, adamw), 0.0 (lora, phased)
    chunk_tokens: int | None = None  # targets scored before each update; None: 32768 (sgd, adamw), 256 (lora)
    freeze_blocks: int = 0  # sgd/adamw: the first K transformer blocks stay fixed
    batch_seqs: int = 32  # training rows (of train_seq_len) per optimizer step
    grad_clip: float = 1.0  # max gradient norm per step; 0 = no clipping
    lora_rank: int = 128  # adapter rank r
    lora_alpha: float = 144.0  # adapter output scale alpha / r
    lora_targets: tuple[str, ...] = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
    lora_weight_decay: float = 1.0  # AdamW weight decay of the adapters
    lora_reset: str = "document"  # document | batch: how often B and the optimizer restart
    lora_batch_docs: int = 64  # documents per segment with lora_reset batch
    lora_warm_start: bool = True  # keep A across segments (only B restarts at zero)
    phases: int = 3  # phased: global SGD pauses over the prefix documents
    prefix_docs: int = 2000  # phased: documents the pauses cover (prefix_docs * i / phases at pause i)
    phase_lr: float = 0.001  # phased: global SGD learning rate
    phase_momentum: float = 0.9  # phased: global SGD momentum
    phase_epochs: int = 1  # phased: global SGD passes over the scored prefix at each pause
    phase_chunk_tokens: int = 32768  # phased: the global SGD lr is cosine-decayed over chunks of this size
    eval_seq_len: int = 2048  # batched: longest context window of a document chunk (capped at max_seq_len)
    lora_o_input: str = "input"  # batched: the O adapter reads the block's normed input, or "attn" (its output)
    batched_targets: tuple[str, ...] = TTT_BATCHED_TARGETS  # batched: which adapters (q k v o mlp head)
    compile: str = "off"  # batched: torch.compile backend of the adapted forward (inductor | aot_eager | off)
    attention_kernel: str = "auto"  # batched: SDPA kernel on CUDA (auto = torch: torch's pick | flash | cudnn |
    # efficient): training's auto picks cuDNN, unmeasured yet for TTT's many window shapes

    def __post_init__(self):
        if self.mode not in TTT_MODES:
            raise ValueError(f"mode = {self.mode!r}: must be one of {', '.join(TTT_MODES)}")
        for name, value in TTT_MODE_DEFAULTS[self.mode].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

        def need(ok: bool, name: str, allowed: str):
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}: must be {allowed}")

        need(0 < self.lr <= 1, "lr", "in (0, 1]")
        need(0 <= self.epochs <= 100, "epochs", "in [0, 100]")
        need(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(self.chunk_tokens >= 1, "chunk_tokens", ">= 1")
        need(self.freeze_blocks >= 0, "freeze_blocks", ">= 0")
        need(self.batch_seqs >= 1, "batch_seqs", ">= 1")
        need(self.grad_clip >= 0, "grad_clip", ">= 0 (0 = off)")
        need(self.lora_rank >= 1, "lora_rank", ">= 1")
        need(self.lora_alpha > 0, "lora_alpha", "> 0")
        need(len(self.lora_targets) >= 1, "lora_targets", "one or more layer names such as attn.c_q, mlp.fc")
        need(self.lora_weight_decay >= 0, "lora_weight_decay", ">= 0")
        need(self.lora_reset in TTT_LORA_RESETS, "lora_reset", f"one of {', '.join(TTT_LORA_RESETS)}")
        need(self.lora_batch_docs >= 1, "lora_batch_docs", ">= 1")
        need(self.phases >= 1, "phases", ">= 1")
        need(self.prefix_docs >= 0, "prefix_docs", ">= 0")
        need(0 < self.phase_lr <= 1, "phase_lr", "in (0, 1]")
        need(0 <= self.phase_momentum < 1, "phase_momentum", "in [0, 1)")
        need(self.phase_epochs >= 1, "phase_epochs", ">= 1")
        need(self.phase_chunk_tokens >= 1, "phase_chunk_tokens", ">= 1")
        need(self.eval_seq_len >= 1, "eval_seq_len", ">= 1")
        need(self.lora_o_input in TTT_O_INPUTS, "lora_o_input", f"one of {', '.join(TTT_O_INPUTS)}")
        need(len(self.batched_targets) >= 1 and set(self.batched_targets) <= set(TTT_BATCHED_TARGETS)
             and len(set(self.batched_targets)) == len(self.batched_targets), "batched_targets",
             f"distinct names from {', '.join(TTT_BATCHED_TARGETS)}")
        need(self.compile in COMPILE_MODES, "compile", f"one of {', '.join(COMPILE_MODES)}")
        need(self.attention_kernel in ATTENTION_KERNELS, "attention_kernel", f"one of {', '.join(ATTENTION_KERNELS)}")


@dataclass
class TTTResult:
    nll: torch.Tensor  # float64 [N - 1] on CPU: NLL of the targets at positions 1..N-1, in order
    events: list[tuple[str, int, int]] = field(default_factory=list)  # ("score" | "update", start, end)
    train_seconds: float = 0.0  # wall time of the training steps (batched: device time of backward + step)
    score_seconds: float = 0.0  # wall time inside score_chunk (batched: device time of the scored forward)
    steps: int = 0  # optimizer steps taken
    # Batched mode's schedule, for the wall time on another GPU count (batched_seconds_on): the phase segments'
    # batch indices, each batch's estimated cost (batch_cost) and measured seconds (whichever rank ran it), and
    # the seconds of the phases' global SGD on this run's ranks; loop_seconds: this rank's batches and phases.
    segments: list[list[int]] = field(default_factory=list)
    batch_costs: list[int] = field(default_factory=list)
    batch_seconds: list[float] = field(default_factory=list)
    phase_seconds: float = 0.0
    loop_seconds: float = 0.0


TTTScoreChunk = Callable[[nn.Module, torch.Tensor, int, int], torch.Tensor]


class TTTLoRALinear(nn.Module):
    """A frozen CastedLinear plus a low-rank update: base(x) + (alpha / rank) * x A^T B^T."""

    def __init__(self, base: CastedLinear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.generator = generator
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.reset_a()

    @torch.no_grad()
    def reset_a(self) -> None:
        bound = 1.0 / math.sqrt(self.base.in_features)
        fresh = torch.empty(self.lora_a.shape).uniform_(-bound, bound, generator=self.generator)
        self.lora_a.copy_(fresh)

    @torch.no_grad()
    def reset_b(self) -> None:
        self.lora_b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + self.scale * update


def ttt_install_lora(model: nn.Module, config: TTTConfig) -> list[TTTLoRALinear]:
    """Wrap each CastedLinear whose name is, or ends with, a lora_targets entry; returns the adapters."""
    generator = torch.Generator().manual_seed(TTT_LORA_SEED)
    adapters, matched = [], set()
    for name, module in list(model.named_modules()):
        targets = [t for t in config.lora_targets if name == t or name.endswith("." + t)]
        if not targets or not isinstance(module, CastedLinear):
            continue
        matched.update(targets)
        parent_name, _, child = name.rpartition(".")
        adapter = TTTLoRALinear(module, config.lora_rank, config.lora_alpha, generator)
        setattr(model.get_submodule(parent_name), child, adapter)
        adapters.append(adapter)
    missing = [t for t in config.lora_targets if t not in matched]
    if missing:
        raise UsageError(f"lora_targets {', '.join(missing)} name no CastedLinear layer of the model")
    return adapters


def ttt_document_spans(tokens: torch.Tensor) -> list[tuple[int, int]]:
    """Target ranges [start, end) of the documents: from after a document's BOS through the next BOS (the
    seeds count the next document's BOS as the last target of this one)."""
    end = len(tokens)
    bos = (tokens == BOS_ID).nonzero().flatten().tolist()
    cuts = sorted({1, end} | {b + 1 for b in bos if 1 < b + 1 < end})
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def ttt_split(start: int, end: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, end)) for s in range(start, end, size)]


def ttt_cosine_lr(peak: float, index: int, count: int) -> float:
    return peak * 0.5 * (1.0 + math.cos(math.pi * index / max(count - 1, 1)))


class TTTSession:
    """The model copy, the scoring and training steps, and the record of what ran in which order."""

    def __init__(self, model, tokens, config, score_chunk, train_seq_len, device, progress, rank=0, world_size=1):
        self.rank, self.world_size = rank, world_size  # batched mode splits its document batches over ranks
        self.model = copy.deepcopy(model).to(device)
        self.model.requires_grad_(False)
        self.tokens = tokens
        self.config = config
        self.score_chunk = score_chunk
        self.train_seq_len = train_seq_len
        self.device = torch.device(device)
        self.progress = progress
        self.nll_parts: list[torch.Tensor] = []
        self.result = TTTResult(nll=torch.zeros(0, dtype=torch.float64))
        self.scored_upto = 1
        self.position_nll: torch.Tensor | None = None  # batched mode: NLL by target position (scored out of order)
        self.last_report = time.perf_counter()

    def score(self, start: int, end: int) -> None:
        if start != self.scored_upto:
            raise ComplianceError(f"TTT scored targets [{start}, {end}) after [1, {self.scored_upto}): every "
                                  f"target is scored exactly once, in order (C4)")
        self.model.eval()
        began = time.perf_counter()
        with torch.no_grad():
            nll = self.score_chunk(self.model, self.tokens, start, end)
        self.result.score_seconds += time.perf_counter() - began
        if nll.shape != (end - start,):
            raise ValueError(f"score_chunk returned shape {tuple(nll.shape)} for the {end - start} targets "
                             f"[{start}, {end})")
        self.nll_parts.append(nll.detach().to("cpu", torch.float64))
        self.result.events.append(("score", start, end))
        self.scored_upto = end
        self.report()

    def train(self, start: int, end: int, params, optimizer, epochs: int, lr: float) -> None:
        """`epochs` passes of optimizer steps on the targets [start, end), all of which must be scored."""
        if end > self.scored_upto:
            raise ComplianceError(f"TTT would train on targets [{start}, {end}) but only [1, "
                                  f"{self.scored_upto}) are scored (C3: score before update)")
        self.result.events.append(("update", start, end))
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        began = time.perf_counter()
        batches = ttt_row_batches(ttt_rows(start, end, self.train_seq_len), self.config.batch_seqs)
        for _ in range(epochs):
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                self.batch_loss(batch).backward()
                if self.config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                optimizer.step()
                self.result.steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.result.train_seconds += time.perf_counter() - began

    def batch_loss(self, batch: list[tuple[int, int, int]]) -> torch.Tensor:
        """Mean NLL of the trained targets of rows (context_start, first_target, end) of equal length."""
        length = batch[0][2] - batch[0][0]
        offsets = torch.arange(length + 1)
        index = torch.stack([offsets + context_start - 1 for context_start, _, _ in batch])
        rows = self.tokens[index.to(self.tokens.device)].to(self.device, torch.int64)
        inputs, targets = rows[:, :-1], rows[:, 1:]
        first = torch.tensor([first_target - context_start for context_start, first_target, _ in batch])
        trained = (offsets[None, :length] >= first[:, None]).to(self.device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model.logits(inputs)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
        return (nll.view_as(trained) * trained).sum() / trained.sum()

    def report(self) -> None:
        now = time.perf_counter()
        if self.progress is None or now - self.last_report < TTT_PROGRESS_SECONDS:
            return
        self.last_report = now
        scored = self.scored_upto - 1
        mean_nll = float(sum(part.sum() for part in self.nll_parts)) / max(scored, 1)
        self.progress(f"ttt {self.config.mode}: {scored}/{len(self.tokens) - 1} targets scored, mean NLL "
                      f"{mean_nll:.4f}, {self.result.steps} steps, {self.result.train_seconds:.0f} s train")

    def report_batched(self, scored: int) -> None:
        now = time.perf_counter()
        if self.progress is None or now - self.last_report < TTT_PROGRESS_SECONDS:
            return
        self.last_report = now
        self.progress(f"ttt batched: {scored}/{len(self.tokens) - 1} targets scored, {self.result.steps} steps, "
                      f"{self.result.train_seconds:.0f} s train")

    def finish(self) -> TTTResult:
        if self.position_nll is not None:
            self.result.nll = self.position_nll[1:]
            return self.result
        self.result.nll = torch.cat(self.nll_parts) if self.nll_parts else torch.zeros(0, dtype=torch.float64)
        return self.result


def ttt_rows(start: int, end: int, seq_len: int) -> list[tuple[int, int, int]]:
    """Training rows (context_start, first_target, end) covering the targets [start, end) in pieces of at most
    seq_len; a short last piece reaches back over earlier (already scored) tokens for context, up to seq_len
    targets in all, and trains only on its own."""
    rows = []
    for first_target in range(start, end, seq_len):
        row_end = min(first_target + seq_len, end)
        rows.append((max(1, row_end - seq_len), first_target, row_end))
    return rows


def ttt_row_batches(rows: list[tuple[int, int, int]], batch_seqs: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive rows of equal length, at most batch_seqs at a time."""
    batches: list[list[tuple[int, int, int]]] = []
    for row in rows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_seqs and last[0][2] - last[0][0] == row[2] - row[0]:
            last.append(row)
        else:
            batches.append([row])
    return batches


def ttt_full_model(session: TTTSession) -> None:
    config, model = session.config, session.model
    layout = model.layout
    frozen = tuple(layout.prefix(block) for block in layout.first_blocks(config.freeze_blocks))
    params = [p for name, p in model.named_parameters() if not name.startswith(frozen)]
    for p in params:
        p.requires_grad_(True)
    if config.mode == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.momentum, TTT_ADAM_BETA2),
                                      eps=TTT_ADAM_EPS, weight_decay=0.0)
    chunks = ttt_split(1, len(session.tokens), config.chunk_tokens)
    for index, (start, end) in enumerate(chunks):
        session.score(start, end)
        if index < len(chunks) - 1 and config.epochs:
            lr = ttt_cosine_lr(config.lr, index, len(chunks))
            session.train(start, end, params, optimizer, config.epochs, lr)


def ttt_phase_ends(config: TTTConfig, documents: int) -> set[int]:
    """Document counts after which phased TTT pauses: prefix_docs * i / phases, fixed numbers, so whether a
    pause comes before a target never depends on how many documents follow it (C1). A stream with fewer
    documents gets fewer pauses, and none after its last document."""
    if config.mode != "phased":
        return set()
    ends = {config.prefix_docs * (i + 1) // config.phases for i in range(config.phases)}
    return {end for end in ends if 0 < end < documents}


def ttt_segments(config: TTTConfig, documents: int, phase_ends: set[int]) -> list[tuple[int, int]]:
    """Document index ranges [first, last) between adapter resets; phase pauses always end a segment."""
    size = 1 if config.lora_reset == "document" else config.lora_batch_docs
    cuts = sorted(set(range(0, documents, size)) | phase_ends | {documents})
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def ttt_lora(session: TTTSession) -> None:
    config, model = session.config, session.model
    base_params = list(model.parameters())
    adapters = ttt_install_lora(model, config)
    lora_params = [p for adapter in adapters for p in (adapter.lora_a, adapter.lora_b)]
    documents = ttt_document_spans(session.tokens)
    phase_ends = ttt_phase_ends(config, len(documents))
    segments = ttt_segments(config, len(documents), phase_ends)
    for first_doc, last_doc in segments:
        for adapter in adapters:
            adapter.reset_b()
            if not config.lora_warm_start:
                adapter.reset_a()
        for p in lora_params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(lora_params, lr=config.lr, betas=(config.momentum, TTT_ADAM_BETA2),
                                      eps=TTT_ADAM_EPS, weight_decay=config.lora_weight_decay)
        chunks = ttt_split(documents[first_doc][0], documents[last_doc - 1][1], config.chunk_tokens)
        for index, (start, end) in enumerate(chunks):
            session.score(start, end)
            if index < len(chunks) - 1 and config.epochs:
                session.train(start, end, lora_params, optimizer, config.epochs, config.lr)
        if last_doc in phase_ends:
            ttt_global_sgd(session, base_params, adapters, documents[last_doc - 1][1])


def ttt_global_sgd(session: TTTSession, base_params, adapters: list[TTTLoRALinear], end: int) -> None:
    """Phased TTT's pause: SGD on the base weights over every scored target [1, end), adapters off; then
    fresh adapters for the documents that follow."""
    config = session.config
    for adapter in adapters:
        adapter.reset_b()  # B = 0: the adapters add nothing while the base trains
        adapter.lora_a.requires_grad_(False)
        adapter.lora_b.requires_grad_(False)
    for p in base_params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(base_params, lr=config.phase_lr, momentum=config.phase_momentum)
    chunks = ttt_split(1, end, config.phase_chunk_tokens)
    for index, (start, chunk_end) in enumerate(chunks):
        lr = ttt_cosine_lr(config.phase_lr, index, len(chunks))
        session.train(start, chunk_end, base_params, optimizer, config.phase_epochs, lr)
    for p in base_params:
        p.requires_grad_(False)
    for adapter in adapters:
        adapter.reset_a()



# -------------------------------------------------------------------------------------------------------
# The records' TTT (04-10 / 04-16 / 04-27 lineage, seed #1790): doc-batched LoRA, with optional phased SGD.
#
# Documents are the stream's BOS-delimited spans (ttt_document_spans: a document's targets run through the next
# BOS). As the records order them, documents are sorted by length (stable, ties in stream order), cut into
# batches of `lora_batch_docs`, and the batches run longest first. Inside a batch every document has its own
# adapters (row b of each adapter tensor); the batch walks chunk index ci = 0, 1, ...: each document that still
# has a chunk ci scores it in one forward over its context window (the chunk's end and up to eval_seq_len
# tokens before it, never before the document's BOS; the records' _compute_chunk_window), and then each document
# with a later chunk trains its adapters on the per-document mean NLL of that chunk (one AdamW step per epoch,
# no gradient clipping: each document's step depends on its own tokens only). At each batch B restarts at 0 and
# the optimizer restarts; A restarts too unless lora_warm_start (then row b's A carries over, trained by the
# documents scored in row b before).
#
# Adapters (batched_targets), y += (lora_alpha / lora_rank) * x A^T B^T, one set per block run (depth recurrence
# runs a block several times, each run its own slot):
#   q, k, v: on attn.c_q / c_k / c_v, reading the block's normed input (the projection's own input);
#   o:       added to attn.proj's output, reading the block's normed input (lora_o_input "input", 04-16's code)
#            or the attention output, proj's own input ("attn");
#   mlp:     added to the MLP's output, reading the MLP's normed input;
#   head:    added to the raw logits before the softcap, reading the final normed hidden state (tied or not).
# The adapters live in forward hooks on the model's own modules, so the adapted forward is GPT.hidden and
# GPT.logits_from_hidden exactly, plus the adapters (with B = 0 it equals model.logits bit for bit).
#
# Phases (prefix_docs > 0): after the batch in which the count of scored documents reaches prefix_docs * i /
# phases (i = 1..phases; none after the last batch), SGD trains every base weight on every document scored so
# far, in rows that stay inside one document (a row's inputs start at or after its document's BOS), lr cosine-
# decayed over groups of phase_chunk_tokens targets; then scoring resumes with B = 0.
#
# Legality: a score uses only its document's earlier tokens plus weights trained on already-scored targets (C3);
# the order depends on document lengths (BOS positions) only. pgolf.compliance checks such out-of-order runs
# with BOS positions held fixed.

def batched_order(spans: list[tuple[int, int]], batch_docs: int) -> list[list[int]]:
    """Document indices per batch, in the order the batches run: sorted by length (stable), batches of
    batch_docs, the batch with the longest document first (ties keep the sorted order)."""
    by_length = sorted(range(len(spans)), key=lambda d: spans[d][1] - spans[d][0])
    batches = [by_length[i : i + batch_docs] for i in range(0, len(by_length), batch_docs)]
    return sorted(batches, key=lambda batch: -max(spans[d][1] - spans[d][0] for d in batch))


def chunk_window(ci: int, pred_len: int, num_chunks: int, chunk: int, window: int) -> tuple[int, int, int, int]:
    """(window start, window length, chunk offset in the window, chunk length), in target indices of the
    document: chunk ci's targets and up to `window` targets of context ending with it."""
    chunk_end = pred_len if ci == num_chunks - 1 else (ci + 1) * chunk
    win_start = max(0, chunk_end - window)
    return win_start, chunk_end - win_start, ci * chunk - win_start, chunk_end - ci * chunk


class BatchedAdapters(nn.Module):
    """A [docs, rank, in] and B [docs, out, rank] per adapter key ("q3": q of execution slot 3, "head")."""

    def __init__(self, model, targets, rank: int, alpha: float, docs: int, slots: int):
        super().__init__()
        config = model.config
        dim, kv_dim = config.model_dim, config.num_kv_heads * config.head_dim
        shapes = {"q": (dim, dim), "k": (dim, kv_dim), "v": (dim, kv_dim), "o": (dim, dim), "mlp": (dim, dim)}
        weight = model.tok_emb.weight
        self.scale = alpha / rank
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        keys = [(f"{kind}{slot}", shapes[kind]) for kind in targets if kind != "head" for slot in range(slots)]
        if "head" in targets:
            keys.append(("head", (dim, config.vocab_size)))
        for key, (fan_in, fan_out) in keys:
            self.a[key] = nn.Parameter(torch.empty(docs, rank, fan_in, device=weight.device, dtype=weight.dtype))
            self.b[key] = nn.Parameter(torch.zeros(docs, fan_out, rank, device=weight.device, dtype=weight.dtype))
        self.reset_a(0)

    @torch.no_grad()
    def reset_a(self, batch_index: int) -> None:
        """A ~ U(+-1/sqrt(fan_in)), drawn on A's device from a seed of the batch's index: the same whichever rank
        runs it (up to 0.5 G values per batch at the records' rank and 64 documents: too many for the CPU)."""
        generator = None
        for a in self.a.values():
            if generator is None:
                generator = torch.Generator(a.device).manual_seed(TTT_LORA_SEED + batch_index)
            bound = 1.0 / math.sqrt(a.size(-1))
            a.uniform_(-bound, bound, generator=generator)

    @torch.no_grad()
    def reset_b(self) -> None:
        for b in self.b.values():
            b.zero_()

    def delta(self, key: str, x: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
        """scale * x A^T B^T for x [n, T, in], row i using document rows[i]'s adapter. A slice of documents is a
        view of the adapters (no copy of up to GBs of A and B per adapted module, no scatter in the backward)."""
        a, b = self.a[key][rows].to(x.dtype), self.b[key][rows].to(x.dtype)
        return self.scale * torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class AdaptedModel:
    """Forward hooks that add the adapters to the model's own modules while `logits` runs."""

    def __init__(self, model, adapters: BatchedAdapters, targets, o_input: str):
        self.model, self.adapters, self.targets, self.o_input = model, adapters, set(targets), o_input
        layout = model.layout if model.looping else block_layout(model.config, looping=False)
        self.slots = {b: [i for i, e in enumerate(layout.execution) if e == b] for b in set(layout.execution)}
        self.rows: slice | torch.Tensor | None = None
        self.adapting = False  # a flag, not `rows is None`: under torch.compile that test would pin a slice's ends
        self.runs: dict[int, int] = {}
        self.slot, self.block_input = 0, None
        self.handles = []
        self.forward = self.logits  # or its compiled form: see compile()
        for index, block in enumerate(model.blocks):
            attn = block.attn
            self.handles += [attn.register_forward_pre_hook(partial(self.enter, index)),
                             attn.c_q.register_forward_hook(partial(self.add, "q")),
                             attn.c_k.register_forward_hook(partial(self.add, "k")),
                             attn.c_v.register_forward_hook(partial(self.add, "v")),
                             attn.proj.register_forward_hook(partial(self.add, "o")),
                             block.mlp.register_forward_hook(partial(self.add, "mlp"))]

    def enter(self, index: int, module, args) -> None:
        if not self.adapting:
            return
        run = self.runs.get(index, 0)
        self.runs[index] = run + 1
        self.slot, self.block_input = self.slots[index][run], args[0]

    def add(self, kind: str, module, args, output):
        if not self.adapting or kind not in self.targets:
            return None
        source = self.block_input if kind == "o" and self.o_input == "input" else args[0]
        return output + self.adapters.delta(f"{kind}{self.slot}", source, self.rows)

    def logits(self, inputs: torch.Tensor, rows: slice | torch.Tensor,
               select: torch.Tensor | None = None) -> torch.Tensor:
        """Softcapped logits [n, T, V] of inputs [n, T], row i adapted by document rows[i]'s adapters; with
        `select` [n, K] only those positions' [n, K, V] (the head and its softmax are the costly part at a
        2048-token context and a large vocabulary, and a chunk scores and trains on 48 of them)."""
        self.rows, self.runs, self.adapting = rows, {}, True
        try:
            hidden = self.model.hidden(inputs)
            if select is not None:
                hidden = hidden.gather(1, select[:, :, None].expand(-1, -1, hidden.size(-1)))
            head = partial(self.adapters.delta, "head", rows=rows) if "head" in self.targets else None
            return self.model.logits_from_hidden(hidden, head)
        finally:
            self.rows, self.block_input, self.adapting = None, None, False

    def compile(self, backend: str) -> None:
        """Make `forward` (logits, by default) torch.compile's form of it with `backend` (nothing for "off"),
        for a contiguous slice of documents (the batches' case: length-sorted, the active documents are always a
        run): traced once with dynamic shapes (the 04-16 record compiles its TTT forward so), the slice's ends
        passed as integers, so new sizes and slices reuse the graph. Rows given as an index tensor run eager."""
        if backend == "off":
            return

        def contiguous(inputs, start: int, stop: int, select):
            return self.logits(inputs, slice(start, stop), select)

        compiled = torch.compile(contiguous, backend=backend, dynamic=True)

        def forward(inputs: torch.Tensor, rows: slice | torch.Tensor, select: torch.Tensor | None = None):
            if not isinstance(rows, slice):
                return self.logits(inputs, rows, select)
            with torch._dynamo.config.patch(recompile_limit=TTT_COMPILE_GRAPHS):
                return compiled(inputs, rows.start, rows.stop, select)

        self.forward = forward

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class StepClock:
    """Seconds of device work in named parts of a step without the host waiting on the device each step: CUDA
    events on a GPU, read at `settle` (once a batch, after the copy that waits for its work anyway); the host
    clock elsewhere, where every op has finished when it returns."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.open: list = []
        self.seconds: dict[str, float] = {"score": 0.0, "train": 0.0}  # since the last settle

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, name: str, began) -> None:
        if self.cuda:
            self.open.append((name, began, self.mark()))
        else:
            self.seconds[name] += time.perf_counter() - began

    def settle(self) -> dict[str, float]:
        """Seconds per name since the last settle."""
        for name, began, ended in self.open:
            ended.synchronize()
            self.seconds[name] += began.elapsed_time(ended) / 1000
        self.open.clear()
        settled, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return settled


def ttt_batched(session: TTTSession, score_logits: Callable | None, on_update: Callable | None) -> None:
    config, model, device = session.config, session.model, session.device
    tokens = session.tokens = session.tokens.to(device)  # each chunk's rows are gathered where the model runs
    require_attention_kernel("TTT attention_kernel", config.attention_kernel, model.config, device)
    window = min(config.eval_seq_len, model.config.max_seq_len)
    clock = StepClock(device)
    spans = ttt_document_spans(tokens.cpu())
    batches = batched_order(spans, config.lora_batch_docs)
    slots = len((model.layout if model.looping else block_layout(model.config, looping=False)).execution)
    docs = min(config.lora_batch_docs, len(spans))
    adapters = BatchedAdapters(model, config.batched_targets, config.lora_rank, config.lora_alpha, docs, slots)
    adapted = AdaptedModel(model, adapters, config.batched_targets, config.lora_o_input)
    adapted.compile(config.compile)
    lora_params = list(adapters.parameters())
    scored = torch.zeros(len(tokens), dtype=torch.bool)  # by this rank
    elsewhere = torch.zeros(len(tokens), dtype=torch.bool)  # by other ranks, as of the last phase pause
    session.position_nll = torch.full((len(tokens),), math.nan, dtype=torch.float64)
    thresholds = sorted({config.prefix_docs * (i + 1) // config.phases for i in range(config.phases)} - {0}) \
        if config.prefix_docs else []
    base_params = list(model.parameters())

    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions on the CPU, NLL on the device)

    def score(positions: torch.Tensor, on_device: torch.Tensor, logits: torch.Tensor,
              ranges: list[tuple[int, int]]) -> None:
        """Score the targets at `positions` (CPU; `on_device`: the same on the logits' device): the C4 check
        and the bookkeeping on the CPU, the NLL left on the device until the batch's end (no sync per chunk)."""
        with torch.no_grad():
            if score_logits is not None:
                nll = score_logits(on_device, logits)
            else:
                nll = F.cross_entropy(logits.double(), tokens[on_device].long(), reduction="none")
        if bool(scored[positions].any()) or bool((positions < 1).any()):
            raise ComplianceError("batched TTT scored a target twice (C4)")
        scored[positions] = True
        session.result.events.extend(("score", start, end) for start, end in ranges)
        pending.append((positions, nll.detach()))

    def settle() -> None:
        """The batch's NLL to the CPU (waits for its device work) and its step timings."""
        if pending:
            positions = torch.cat([p for p, _ in pending])
            session.position_nll[positions] = torch.cat([n.double() for _, n in pending]).to("cpu")
            pending.clear()
        settled = clock.settle()
        session.result.score_seconds += settled["score"]
        session.result.train_seconds += settled["train"]

    def update(start: int, end: int) -> None:
        if not bool((scored[start:end] | elsewhere[start:end]).all()):
            raise ComplianceError(f"TTT would train on targets [{start}, {end}) before scoring them (C3)")
        session.result.events.append(("update", start, end))
        if on_update is not None:
            on_update(start, end)

    # The phase pauses cut the batches into segments. Several ranks share each segment's batches, each rank with
    # its own adapters, by estimated cost (the same assignment on every rank, no communication), and meet at
    # the segment's end for the phase's global SGD.
    rank, world = session.rank, session.world_size
    result = session.result
    result.segments = phase_segments(batches, thresholds)
    result.batch_costs = [batch_cost([spans[d] for d in batch], config.chunk_tokens, window) for batch in batches]
    seconds = torch.zeros(len(batches), dtype=torch.float64)
    loop_began = time.perf_counter()
    for segment_index, segment in enumerate(result.segments):
        mine = assign_batches([result.batch_costs[i] for i in segment], world)[rank]
        for batch_index in (segment[i] for i in mine):
            began = time.perf_counter()
            adapters.reset_b()
            if not config.lora_warm_start:
                adapters.reset_a(batch_index)
            # fused on a GPU: one kernel over the up to 0.4 G adapter values instead of a pass per Adam term
            optimizer = torch.optim.AdamW(lora_params, lr=config.lr, betas=(config.momentum, TTT_ADAM_BETA2),
                                          eps=TTT_ADAM_EPS, weight_decay=config.lora_weight_decay,
                                          fused=True if session.device.type == "cuda" else None)
            spans_here = [spans[d] for d in batches[batch_index]]
            with attention_kernels(config.attention_kernel, device):
                ttt_batch(session, adapted, optimizer, spans_here, window, clock, score, update)
            settle()
            seconds[batch_index] = time.perf_counter() - began
            session.report_batched(int(scored.sum()))
        if segment_index < len(result.segments) - 1:  # a phase pause
            began = time.perf_counter()
            elsewhere = ranks_union(scored, session) & ~scored  # other ranks' documents, for the C3 check
            done = [d for batch in batches[: segment[-1] + 1] for d in batch]
            ttt_phase_sgd(session, base_params, sorted(spans[d] for d in done), update)
            adapters.reset_b()
            result.phase_seconds += time.perf_counter() - began
    result.loop_seconds = time.perf_counter() - loop_began
    adapted.remove()
    result.batch_seconds = ranks_total(seconds, session).tolist()
    times = ranks_sum(scored, session)
    if bool((times[1:] > 1).any()):
        raise ComplianceError(f"batched TTT scored {int((times[1:] > 1).sum())} targets on several ranks (C4)")
    if not bool((times[1:] == 1).all()):
        raise ComplianceError(f"batched TTT left {int((times[1:] == 0).sum())} targets unscored (C4)")


def ranks_total(values: torch.Tensor, session: TTTSession) -> torch.Tensor:
    """`values` summed over the ranks (this rank's alone in one process)."""
    if session.world_size == 1:
        return values
    total = values.to(session.device)
    torch.distributed.all_reduce(total)
    return total.cpu()


def ranks_sum(scored: torch.Tensor, session: TTTSession) -> torch.Tensor:
    """How many ranks scored each target."""
    return ranks_total(scored.to(torch.int32), session)


def ranks_union(scored: torch.Tensor, session: TTTSession) -> torch.Tensor:
    """The targets any rank has scored."""
    return ranks_sum(scored, session) > 0


# A chunk step's fixed cost in processed-token equivalents, for balancing batches over ranks: a step of the
# records' TTT is launch-bound when few documents are left (session 7 on an H100: ~1,500 steps, mostly of a
# batch's long tail, and 23 M processed tokens in ~180 s, far beyond those tokens' FLOPs).
TTT_STEP_COST_TOKENS = 65_536


def batch_cost(spans: list[tuple[int, int]], chunk: int, window: int) -> int:
    """A document batch's estimated cost: per chunk step, the fixed cost plus the tokens its forward processes
    (the active documents' rows, each as long as the step's context)."""
    chunks = [(end - start + chunk - 1) // chunk for start, end in spans]
    return sum(TTT_STEP_COST_TOKENS + sum(count > ci for count in chunks) * min((ci + 1) * chunk, window)
               for ci in range(max(chunks)))


def phase_segments(batches: list[list[int]], thresholds: list[int]) -> list[list[int]]:
    """Batch indices between the phase pauses: a pause follows the batch that brings the documents scored (in
    batch order) to a threshold, never the last batch."""
    segments, current, done, pending = [], [], 0, list(thresholds)
    for index, batch in enumerate(batches):
        current.append(index)
        done += len(batch)
        if pending and done >= pending[0] and index < len(batches) - 1:
            while pending and done >= pending[0]:
                pending.pop(0)
            segments.append(current)
            current = []
    return [*segments, current] if current else segments


def assign_batches(costs: list[float], ranks: int) -> list[list[int]]:
    """Indices into `costs` per rank, longest processing time first: each batch, costliest first, to the least
    loaded rank (ties to the lower rank); each rank's list in index order."""
    loads, owned = [0.0] * ranks, [[] for _ in range(ranks)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        least = min(range(ranks), key=lambda r: (loads[r], r))
        loads[least] += costs[index]
        owned[least].append(index)
    return [sorted(indices) for indices in owned]


def batched_seconds_on(result: TTTResult, gpus: int, world_size: int) -> float:
    """Batched TTT's wall time on `gpus` GPUs from a run on `world_size` ranks: each segment's batches assigned
    as a run on that many ranks assigns them, the segment lasting as long as its busiest rank's measured batch
    seconds, plus the phases' SGD (split over the ranks) scaled to the GPU count."""
    total = 0.0
    for segment in result.segments:
        owned = assign_batches([result.batch_costs[i] for i in segment], gpus)
        total += max(sum(result.batch_seconds[segment[j]] for j in indices) for indices in owned)
    return total + result.phase_seconds * world_size / gpus


def ttt_batch(session: TTTSession, adapted: AdaptedModel, optimizer, spans, window: int, clock: StepClock, score,
              update):
    """One batch of documents, chunk by chunk: score every document's chunk ci, then train on it. The host
    never waits on the device here: each chunk's indices go over in one pinned copy, and the caller collects
    the NLL (and the step timings) once the batch is done."""
    config, device = session.config, session.device
    chunk = config.chunk_tokens
    pred_lens = [end - start for start, end in spans]
    num_chunks = [(length + chunk - 1) // chunk for length in pred_lens]
    # Logits only at each row's chunk (`select` [n, chunk]; a short last chunk repeats its last position), and
    # the active documents (a contiguous run, the batch being length-sorted) as a slice of the adapters.
    for ci in range(max(num_chunks)):
        active = [b for b, count in enumerate(num_chunks) if ci < count]
        training = [i for i, b in enumerate(active) if ci < num_chunks[b] - 1]
        train = bool(training) and config.epochs > 0
        context = min((ci + 1) * chunk, window)
        # per row: [window start in the token stream (the token before its first target), window length,
        # chunk offset in the window, chunk length]
        geometry = torch.tensor([(spans[b][0] - 1 + win_start, win_len, offset, length) for b in active for
                                 win_start, win_len, offset, length in
                                 [chunk_window(ci, pred_lens[b], num_chunks[b], chunk, window)]], dtype=torch.int64)
        first, win_len, offset, length = geometry.unbind(1)
        width = int(length.max())
        steps = torch.arange(width)
        chunked = steps[None, :] < length[:, None]  # [n, width]: the positions each row scores
        positions = (first + offset + 1)[:, None].add(steps)[chunked]
        flat = torch.arange(len(active) * width).view(len(active), width)[chunked]
        contiguous = active == list(range(active[0], active[-1] + 1))
        mask = torch.zeros(len(active), dtype=torch.int64)
        mask[training] = 1
        rows_list = torch.tensor([] if contiguous else active, dtype=torch.int64)
        parts = [geometry.flatten(), positions, flat, mask, rows_list]
        sizes = [len(part) for part in parts]
        packed = torch.cat(parts)
        if device.type == "cuda":
            packed = packed.pin_memory()
        geometry_d, positions_d, flat_d, mask_d, rows_d = packed.to(device, non_blocking=True).split(sizes)
        first_d, win_len_d, offset_d, length_d = geometry_d.view(-1, 4).unbind(1)
        columns = torch.arange(context + 1, device=device)
        valid = columns[None, :] <= win_len_d[:, None]
        index = torch.where(valid, first_d[:, None] + columns[None, :], 0)
        rows_tokens = torch.where(valid, session.tokens[index].long(), 0)
        inputs, targets = rows_tokens[:, :-1], rows_tokens[:, 1:]
        select = offset_d[:, None] + torch.minimum(torch.arange(width, device=device)[None, :], length_d[:, None] - 1)
        rows = slice(active[0], active[-1] + 1) if contiguous else rows_d
        model = session.model
        model.train(train)
        began = clock.mark()
        with torch.set_grad_enabled(train), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            logits = adapted.forward(inputs, rows, select)
        ranges = list(zip((first + offset + 1).tolist(), (first + offset + 1 + length).tolist(), strict=True))
        score(positions, positions_d, logits.detach().reshape(-1, logits.size(-1))[flat_d], ranges)
        clock.add("score", began)
        if not train:
            continue
        began = clock.mark()
        targets = targets.gather(1, select)  # a training row's chunk is whole: select is its chunk's positions
        for i in training:
            b = active[i]
            origin = spans[b][0] - 1
            win_start = max(0, (ci + 1) * chunk - window)
            update(origin + max(win_start, 1), origin + (ci + 1) * chunk + 1)
        for epoch in range(config.epochs):
            if epoch:
                with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                    logits = adapted.forward(inputs, rows, select)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                  reduction="none").view(len(active), width)
            per_doc = nll[:, :chunk].mean(dim=-1)
            optimizer.zero_grad(set_to_none=True)
            (per_doc * mask_d.float()).sum().backward()
            optimizer.step()
            session.result.steps += 1
        clock.add("train", began)


def document_rows(spans, seq_len: int) -> list[tuple[int, int, int]]:
    """Training rows (context_start, first_target, end) that never cross a BOS: each document's targets in
    pieces of at most seq_len, a short last piece reaching back for context inside its own document only."""
    rows = []
    for start, end in spans:
        for first in range(start, end, seq_len):
            row_end = min(first + seq_len, end)
            rows.append((max(start, row_end - seq_len), first, row_end))
    return rows


def ttt_phase_sgd(session: TTTSession, base_params, spans, update) -> None:
    """Global SGD on every base weight over the scored documents `spans`, rows packed per document."""
    config, model = session.config, session.model
    for start, end in spans:
        update(start, end)
    rows = sorted(document_rows(spans, session.train_seq_len), key=lambda row: row[2] - row[0])
    groups, current, count = [], [], 0
    for batch in ttt_row_batches(rows, session.config.batch_seqs):
        current.append(batch)
        count += sum(end - first for _, first, end in batch)
        if count >= config.phase_chunk_tokens:
            groups.append(current)
            current, count = [], 0
    if current:
        groups.append(current)
    for p in base_params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(base_params, lr=config.phase_lr, momentum=config.phase_momentum)
    model.train()
    began = time.perf_counter()
    world = session.world_size
    for index, group in enumerate(groups):
        for param_group in optimizer.param_groups:
            param_group["lr"] = ttt_cosine_lr(config.phase_lr, index, len(groups))
        for _ in range(config.phase_epochs):
            # One step per W batches under W ranks (rank r takes the r-th), gradients averaged: the base weights
            # stay identical on every rank.
            for first in range(0, len(group), world):
                optimizer.zero_grad(set_to_none=True)
                mine = first + session.rank
                if mine < len(group):
                    session.batch_loss(group[mine]).backward()
                if world > 1:
                    average_gradients(base_params, min(world, len(group) - first))
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(base_params, config.grad_clip)
                optimizer.step()
                session.result.steps += 1
    for p in base_params:
        p.requires_grad_(False)
    session.result.train_seconds += time.perf_counter() - began


def average_gradients(params, contributors: int) -> None:
    """Sum each gradient over ranks and divide by the ranks that had a batch (a rank without one adds zeros)."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)
        param.grad /= contributors


def check_batched_usage(ngram) -> None:
    if ngram:
        raise UsageError("TTT mode batched scores documents out of stream order; the n-gram cache needs the "
                         "stream's order: drop the n-gram grid or pick another TTT mode")


def run_ttt(model: nn.Module, tokens: torch.Tensor, config: TTTConfig, score_chunk: TTTScoreChunk,
            train_seq_len: int, device, progress: Callable[[str], None] | None = None,
            score_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            on_update: Callable[[int, int], None] | None = None, rank: int = 0, world_size: int = 1) -> TTTResult:
    """Score every target of `tokens` (positions 1..N-1) score-first with TTT per `config`.

    score_chunk(model, tokens, start, end) returns the float64 NLL [end - start] of the targets start..end-1
    under the model's current weights (the eval's windows, modes and n-gram mixing live there). `progress`
    receives a status line now and then.

    The batched mode scores its own document windows, out of stream order: score_logits(positions, logits)
    scores the targets at `positions` from their logits [n, V] and returns their float64 NLL (None: plain
    cross-entropy), and on_update(start, end) hears of each update of the targets [start, end) as it happens.
    It alone runs on several ranks (`rank` of `world_size`, torch.distributed initialized): each scores its
    share of the document batches, so result.nll holds NaN where other ranks scored; the other modes adapt one
    model through the whole stream and run in one process."""
    if len(tokens) < 2:
        raise UsageError(f"TTT needs at least 2 tokens, got {len(tokens)}")
    max_seq_len = model.config.max_seq_len
    if not 1 <= train_seq_len <= max_seq_len:
        raise UsageError(f"train_seq_len {train_seq_len}: must be in [1, max_seq_len {max_seq_len}]")
    if config.freeze_blocks > model.layout.num_blocks:
        raise UsageError(f"freeze_blocks {config.freeze_blocks} > the model's {model.layout.num_blocks} blocks")
    if world_size > 1 and config.mode != "batched":
        raise UsageError(f"TTT mode {config.mode} runs in one process (its weights follow the whole stream); "
                         f"only batched splits over {world_size} ranks")
    session = TTTSession(model, tokens, config, score_chunk, train_seq_len, device, progress, rank, world_size)
    if config.mode == "batched":
        ttt_batched(session, score_logits, on_update)
    elif config.mode in ("sgd", "adamw"):
        ttt_full_model(session)
    else:
        ttt_lora(session)
    return session.finish()
