"""Exact evaluation of the validation stream: window planning, per-target scoring, n-gram mixing, TTT hook.

The stream is every val shard concatenated (it starts with BOS). Target p (1 <= p < N) is tokens[p], scored
once given the tokens before it. A window is a row (start, first, end): the model reads tokens[start:end] and
its scores count for targets first..end (inclusive); target p sees tokens[start:p] as context.

Modes (each scores every target exactly once, none dropped at the tail):
- flat: non-overlapping windows of seq_len, the challenge's eval_val. The challenge drops the last
  (N - 1) % seq_len targets; we score them in one shorter final window.
- sliding (stride S < seq_len): the first window scores targets 1..seq_len, each later one the next S, each
  seeing >= seq_len - S + 1 tokens. A window's start depends only on its first target, never on where the
  stream or document ends, so no later token (a later BOS included) can change a score (C1).
- doc-isolated: the same plan inside each document: target p of the document whose BOS is at b sees
  tokens[b:p] only. The BOS that starts the next document is the last target of the one before.

val_loss = sum NLL / targets, val_bpb = sum NLL / (ln 2 * sum bytes), sums in float64 (REFERENCE.md).
"""

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pgolf.bpb import ByteTables
from pgolf.errors import ComplianceError
from pgolf.ngram import (
    NGRAM_BLOCK_ELEMENTS,
    NgramConfig,
    NgramMixer,
    TiltConfig,
    ngram_mixture_weight,
    tilt_gold_nll,
    tilt_logprobs,
)
from pgolf.shards import BOS_ID
from pgolf.ttt import TTTConfig, TTTResult, check_batched_usage, run_ttt

# -------------------------------------------------------------------------------------------------------
# Window planning


def plan_span(first: int, last: int, seq_len: int, stride: int, base: int = 0) -> np.ndarray:
    """Windows (start, first, end) scoring targets first..last, reading nothing before `base`.

    The first window scores up to max(base + seq_len, first - 1 + stride), each later one the next `stride`.
    """
    if last < first:
        return np.zeros((0, 3), dtype=np.int64)
    end0 = min(max(base + seq_len, first - 1 + stride), last)
    ends = np.minimum(np.concatenate([[end0], np.arange(end0 + stride, last + stride, stride)]), last)
    firsts = np.concatenate([[first], ends[:-1] + 1])
    starts = np.maximum(base, firsts - 1 - (seq_len - stride))
    return np.stack([starts, firsts, ends], axis=1).astype(np.int64)


def document_starts(tokens: np.ndarray, last: int) -> np.ndarray:
    """Positions of the BOSes that start documents with targets <= last (position 0 always starts one)."""
    bos = np.flatnonzero(np.asarray(tokens[:last]) == BOS_ID)
    return bos if bos.size and bos[0] == 0 else np.concatenate([[0], bos]).astype(np.int64)


def plan_windows(
    tokens: np.ndarray, seq_len: int, stride: int, doc_isolated: bool, first: int = 1, last: int | None = None
) -> np.ndarray:
    """The windows that score targets first..last (default: all) in increasing position order."""
    last = len(tokens) - 1 if last is None else last
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride {stride}: must be in [1, seq_len = {seq_len}]")
    if not doc_isolated:
        return plan_span(first, last, seq_len, stride)
    starts = document_starts(tokens, last)
    doc_lasts = np.append(starts[1:], last)  # a document's targets run through the next BOS
    keep = doc_lasts >= first
    spans = [
        plan_span(max(first, int(start) + 1), min(last, int(doc_last)), seq_len, stride, int(start))
        for start, doc_last in zip(starts[keep], doc_lasts[keep], strict=True)
    ]
    return np.concatenate(spans) if spans else np.zeros((0, 3), dtype=np.int64)


def split_for_rank(windows: np.ndarray, rank: int, world_size: int, batch_seqs: int) -> np.ndarray:
    """A contiguous share of whole batches of windows: each rank's targets are one increasing run, and its
    batches (hence n-gram update points) are exactly those of a single process."""
    batches = -(-len(windows) // batch_seqs)
    first, last = batches * rank // world_size, batches * (rank + 1) // world_size
    return windows[first * batch_seqs : last * batch_seqs]


# -------------------------------------------------------------------------------------------------------
# Scoring


class EvalModel:
    """A GPT split for scoring: the hidden pass on fixed-shape [batch, seq_len] inputs (compiled on CUDA when
    asked), then the output head only at the positions a window scores (64 of 1024 at stride 64)."""

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.compiled = compile
        self.hidden = torch.compile(model.hidden, dynamic=False) if compile else model.hidden

    def logits_at(self, inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Softcapped logits [len(rows), V] at the flattened positions `rows`, by GPT.logits' ops: bf16
        autocast on CUDA, else the model's dtype (float64 in compliance checks); at least float32."""
        model = self.model
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=inputs.device.type == "cuda"):
            hidden = self.hidden(inputs)
            hidden = hidden.reshape(-1, hidden.size(-1))[rows]
            return model.logits_from_hidden(hidden)


def as_eval_model(model) -> EvalModel:
    return model if isinstance(model, EvalModel) else EvalModel(model)


def scored_logits(model, tokens: torch.Tensor, windows: np.ndarray, seq_len: int, batch_seqs: int):
    """Yield (target_positions [n] int64, logits [n, V]) per batch of windows, in increasing position order.

    Batches are always [batch_seqs, seq_len]: short windows and missing rows are padded after the real
    tokens, where a causal model never looks, so a compiled forward sees one shape.
    """
    model = as_eval_model(model)
    device = tokens.device
    offsets = np.arange(seq_len, dtype=np.int64)
    for batch_start in range(0, len(windows), batch_seqs):
        batch = windows[batch_start : batch_start + batch_seqs]
        count = len(batch)
        input_positions = np.zeros((batch_seqs, seq_len), dtype=np.int64)
        input_positions[:count] = batch[:, :1] + offsets
        target_positions = input_positions + 1
        scored = np.zeros((batch_seqs, seq_len), dtype=bool)
        real_targets = target_positions[:count]
        scored[:count] = (real_targets >= batch[:, 1:2]) & (real_targets <= batch[:, 2:3])
        rows = np.flatnonzero(scored)
        np.minimum(input_positions, len(tokens) - 1, out=input_positions)
        inputs = tokens[torch.from_numpy(input_positions).to(device, non_blocking=True)].long()
        logits = model.logits_at(inputs, torch.from_numpy(rows).to(device, non_blocking=True))
        yield torch.from_numpy(target_positions.reshape(-1)[rows]).to(device, non_blocking=True), logits


@torch.inference_mode()
def score(model, tokens: torch.Tensor, windows: np.ndarray, seq_len: int, batch_seqs: int) -> torch.Tensor:
    """Per-target NLL (nats) in target order for every target the windows score."""
    chunks = [
        F.cross_entropy(logits, tokens[positions].long(), reduction="none")
        for positions, logits in scored_logits(model, tokens, windows, seq_len, batch_seqs)
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0, device=tokens.device)


def iter_logprobs(model, tokens: torch.Tensor, windows: np.ndarray, seq_len: int, batch_seqs: int):
    """Yield (target_positions [n], model_logprobs [n, V]) in increasing position order: the n-gram mixer's
    input (float32, or float64 from a float64 model)."""
    for positions, logits in scored_logits(model, tokens, windows, seq_len, batch_seqs):
        yield positions, torch.log_softmax(logits, dim=-1)


def gold_nll(logprobs: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return -logprobs.gather(1, tokens[positions].long()[:, None])[:, 0]


# -------------------------------------------------------------------------------------------------------
# N-gram sweeps


class NgramSweep:
    """Every grid point (n-gram mixture: order, alpha; token tilt: order, boost, gates) from one model pass and
    one set of count tables.

    The largest order's mixer serves all: its interpolation chain passes through every lower order
    (NgramMixer.distributions), so each chunk builds it once and mixes each point from the p_k of its order,
    with NgramMixer.mix's formula log((1 - a) p_model + a p_k); a tilt point reads its hints from the same
    rows (NgramMixer.followers). A scored pass needs only each target's own entry of that (normalized)
    distribution, O(1) per point; the full [n, V] rows are built only for tracing, which is what the
    compliance check inspects (test: equal to NgramMixer.mix, point by point).
    """

    def __init__(self, configs: list, vocab_size: int, device):
        self.configs = configs
        buckets = {config.buckets for config in configs}
        if len(buckets) > 1:
            raise ValueError(f"a sweep shares one set of count tables: its points' buckets differ ({buckets})")
        order = max(config.order for config in configs)
        self.mixer = NgramMixer(NgramConfig(order, buckets=buckets.pop()), vocab_size, device)
        self.orders = {config.order for config in configs if isinstance(config, NgramConfig)}
        tilt_order = max((config.order for config in configs if isinstance(config, TiltConfig)), default=1)
        self.tilt_orders = range(2, tilt_order + 1)

    def update(self, tokens: torch.Tensor, upto_position: int) -> np.ndarray:
        """Count positions [counted_upto, upto_position); returns the positions counted."""
        counted = np.arange(self.mixer.counted_upto, upto_position)
        self.mixer.update(tokens, upto_position)
        return counted

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, positions: torch.Tensor, model_logprobs: torch.Tensor,
              keep_distributions: bool = False) -> tuple[list, list | None]:
        """(gold NLL [n] per grid point, and their log-distributions [n, V] when asked) for the targets at
        `positions`, from counts of earlier positions only."""
        mixer = self.mixer
        if len(positions) and int(positions.min()) < mixer.counted_upto:
            raise ComplianceError(f"n-gram cache: target {int(positions.min())} is already counted (counts "
                                  f"cover positions < {mixer.counted_upto}); score before update (C3)")
        nll = [[] for _ in self.configs]
        kept = [[] for _ in self.configs] if keep_distributions else None
        block = max(1, NGRAM_BLOCK_ELEMENTS // mixer.vocab_size)
        for start in range(0, len(positions), block):
            block_positions = positions[start : start + block]
            model_block = model_logprobs[start : start + block]
            gold = tokens[block_positions].long().to(mixer.device)
            p_by_order = mixer.distributions(tokens, block_positions, self.orders, model_logprobs.dtype) \
                if self.orders else {}
            followers = mixer.followers(tokens, block_positions, self.tilt_orders)
            for index, config in enumerate(self.configs):
                if isinstance(config, TiltConfig):
                    point_nll = tilt_gold_nll(config, model_block, gold, followers)
                    if kept is not None:
                        kept[index].append(tilt_logprobs(config, model_block, followers))
                else:
                    alpha = ngram_mixture_weight(config, model_block)
                    if kept is None:
                        point_nll = -mix_logprobs(model_block.gather(1, gold[:, None]),
                                                  p_by_order[config.order].gather(1, gold[:, None]), alpha)[:, 0]
                    else:
                        mixed = mix_logprobs(model_block, p_by_order[config.order], alpha)
                        kept[index].append(mixed)
                        point_nll = -mixed.gather(1, gold[:, None])[:, 0]
                nll[index].append(point_nll)
        return [torch.cat(parts) for parts in nll], kept and [torch.cat(parts) for parts in kept]


def mix_logprobs(model_logprobs: torch.Tensor, p_ngram: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log((1 - alpha) p_model + alpha p_ngram), elementwise: NgramMixer.mix's formula."""
    return torch.logaddexp(model_logprobs + torch.log1p(-alpha), alpha.log() + p_ngram.log())


def ngram_name(config) -> str:
    """A grid point's scorer name: `ngram<order>_a<alpha>[_entropy]` or `tilt<order>_b<boost>_t<threshold>_m<min
    count>[_g<gamma>]`."""
    if isinstance(config, TiltConfig):
        return (f"tilt{config.order}_b{config.boost:g}_t{config.threshold:g}_m{config.min_count}"
                + (f"_g{config.gamma:g}" if config.gamma else ""))
    return f"ngram{config.order}_a{config.alpha:g}" + ("_entropy" if config.alpha_mode == "entropy" else "")


# -------------------------------------------------------------------------------------------------------
# Totals, trace and the scored pass


@dataclass
class Totals:
    """Float64 sums over scored targets (all-reduced across ranks before val_loss/val_bpb are read)."""

    nll_sum: float = 0.0
    targets: int = 0
    bytes: int = 0

    @property
    def val_loss(self) -> float:
        return self.nll_sum / self.targets if self.targets else math.nan

    @property
    def val_bpb(self) -> float:
        return self.nll_sum / (math.log(2) * self.bytes) if self.bytes else math.nan


@dataclass
class Trace:
    """What the compliance checker inspects: each scorer's per-target NLL and full distribution, and the event
    log (("score" | "update", positions)) in the order things happened."""

    positions: list[np.ndarray] = field(default_factory=list)
    nll: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    logprobs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    events: list[tuple[str, np.ndarray]] = field(default_factory=list)
    # The run schedules by document structure (batched TTT: documents sorted by length), so C1 is checked in
    # scoring order with BOS positions held, even where the order happens to follow the stream.
    by_documents: bool = False

    def record(self, name: str, nll: torch.Tensor, logprobs: torch.Tensor) -> None:
        self.nll.setdefault(name, []).append(nll.detach().cpu())
        self.logprobs.setdefault(name, []).append(logprobs.detach().cpu())

    def scored(self, positions: torch.Tensor) -> None:
        positions = positions.cpu().numpy()
        self.positions.append(positions)
        self.events.append(("score", positions))

    def scores(self, name: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(positions, nll, logprobs) of one scorer, concatenated in scoring order."""
        return np.concatenate(self.positions), torch.cat(self.nll[name]), torch.cat(self.logprobs[name])


class ByteCounter:
    """Bytes of scored targets, on the scoring device: base[y] + leading space unless prev is a boundary."""

    def __init__(self, tables: ByteTables, device):
        self.base_bytes, self.has_leading_space, self.is_boundary = tables.torch(device)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        targets, prevs = tokens[positions].long(), tokens[positions - 1].long()
        space = self.has_leading_space[targets] & ~self.is_boundary[prevs]
        return (self.base_bytes[targets].long() + space.long()).sum()


class Accumulator:
    """Float64 NLL sum, target count and byte count on the device (one host sync at the end)."""

    def __init__(self, device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, nll: torch.Tensor, byte_count: torch.Tensor) -> None:
        self.sums[0] += nll.double().sum()
        self.sums[1] += nll.numel()
        self.sums[2] += byte_count.double()

    def totals(self) -> Totals:
        nll_sum, targets, byte_count = self.sums.tolist()
        return Totals(nll_sum, int(targets), int(byte_count))


class Scorer:
    """Scores chunks of targets in position order: the model, then each n-gram grid point from the same model
    distributions; accumulates each one's totals and, when tracing, what the compliance checker needs."""

    def __init__(self, tokens: torch.Tensor, count_bytes: ByteCounter, ngram: list[NgramConfig | TiltConfig],
                 vocab_size: int, trace: Trace | None = None):
        self.tokens = tokens
        self.count_bytes = count_bytes
        self.sweep = NgramSweep(ngram, vocab_size, tokens.device) if ngram else None
        self.names = ["model"] + [ngram_name(config) for config in ngram]
        self.totals = {name: Accumulator(tokens.device) for name in self.names}
        self.trace = trace
        self.targets_scored = 0

    def fast_forward(self, upto_position: int) -> None:
        """Count the targets before `upto_position` (scored by earlier ranks) so the n-gram state matches a
        single process that scored them."""
        if self.sweep is not None:
            self.sweep.update(self.tokens, upto_position)

    def score_chunk(self, positions: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Score one chunk; returns the primary scorer's NLL (the n-gram's with one grid point, else the
        model's) in float64."""
        tokens, trace = self.tokens, self.trace
        byte_count = self.count_bytes(tokens, positions)
        if self.sweep is None and trace is None:
            model_nll = F.cross_entropy(logits, tokens[positions].long(), reduction="none")
            self.totals["model"].add(model_nll, byte_count)
            self.targets_scored += len(positions)
            return model_nll.double()
        logprobs = torch.log_softmax(logits, dim=-1)
        model_nll = gold_nll(logprobs, tokens, positions)
        self.totals["model"].add(model_nll, byte_count)
        if trace is not None:
            trace.scored(positions)
            trace.record("model", model_nll, logprobs)
        primary = model_nll
        if self.sweep is not None:
            nlls, mixed = self.sweep.score(tokens, positions, logprobs, keep_distributions=trace is not None)
            for index, (name, nll) in enumerate(zip(self.names[1:], nlls, strict=True)):
                self.totals[name].add(nll, byte_count)
                if trace is not None:
                    trace.record(name, nll, mixed[index])
            primary = nlls[0] if len(nlls) == 1 else model_nll
            counted = self.sweep.update(tokens, int(positions.max()) + 1)
            if trace is not None:
                trace.events.append(("update", counted))
        self.targets_scored += len(positions)
        return primary.double()

    def results(self) -> dict[str, Totals]:
        return {name: accumulator.totals() for name, accumulator in self.totals.items()}


@dataclass
class EvalPlan:
    """How to score: window geometry and the batch size (the resolved parts of EvalConfig)."""

    seq_len: int
    stride: int
    doc_isolated: bool
    batch_seqs: int

    def windows(self, tokens: np.ndarray, first: int = 1, last: int | None = None) -> np.ndarray:
        return plan_windows(tokens, self.seq_len, self.stride, self.doc_isolated, first, last)


@dataclass
class PassResult:
    totals: dict[str, Totals]  # "model" and one per n-gram grid point, all-reduced
    ttt: TTTResult | None = None  # when TTT ran
    eval_seconds: float = 0.0


def scored_pass(
    model: EvalModel, tokens: torch.Tensor, tokens_np: np.ndarray, plan: EvalPlan, scorer: Scorer,
    rank: int = 0, world_size: int = 1, progress=None,
) -> None:
    """The plain pass: this rank's share of the windows, scored in order."""
    windows = split_for_rank(plan.windows(tokens_np), rank, world_size, plan.batch_seqs)
    if rank > 0 and len(windows):
        scorer.fast_forward(int(windows[0, 1]))
    share = int((windows[:, 2] - windows[:, 1] + 1).sum())
    with torch.inference_mode():
        for positions, logits in scored_logits(model, tokens, windows, plan.seq_len, plan.batch_seqs):
            scorer.score_chunk(positions, logits)
            if progress is not None:
                progress(scorer.targets_scored, share)


def ttt_pass(
    model: EvalModel, tokens: torch.Tensor, tokens_np: np.ndarray, plan: EvalPlan, scorer: Scorer,
    ttt_config: TTTConfig, progress=None, rank: int = 0, world_size: int = 1,
):
    """Score-first TTT over the whole stream: in one process in the stream's order, or (batched mode) in
    document batches shared over `world_size` ranks. The TTT code owns the schedule and its model copy; each
    chunk is scored here with this plan and the n-gram grid."""
    eval_models: dict[int, EvalModel] = {}
    trace = scorer.trace
    call_events = []  # the score/n-gram events of each score_chunk call, spliced into TTT's order below

    def score_chunk(ttt_model, chunk_tokens, start: int, end: int) -> torch.Tensor:
        eval_model = eval_models.setdefault(id(ttt_model), EvalModel(ttt_model, compile=model.compiled))
        windows = plan.windows(tokens_np, start, end - 1)
        logged = len(trace.events) if trace is not None else 0
        with torch.inference_mode():
            chunks = scored_logits(eval_model, tokens, windows, plan.seq_len, plan.batch_seqs)
            parts = [scorer.score_chunk(positions, logits) for positions, logits in chunks]
        if trace is not None:
            call_events.append(trace.events[logged:])
            del trace.events[logged:]
        if progress is not None:
            progress(scorer.targets_scored, int(len(tokens_np) - 1))
        return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)

    if ttt_config.mode == "batched":
        # The records' doc-batched TTT scores its own document windows out of stream order: the scorer (and the
        # trace) hear of each score as it happens, and each update in between.
        check_batched_usage(scorer.sweep is not None)
        if trace is not None:
            trace.by_documents = True

        def score_logits(positions: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            nll = scorer.score_chunk(positions, logits)
            if progress is not None:
                progress(scorer.targets_scored, int(len(tokens_np) - 1))
            return nll

        def on_update(start: int, end: int) -> None:
            if trace is not None:
                trace.events.append(("update", np.arange(start, end)))

        return run_ttt(model.model, tokens, ttt_config, score_chunk, plan.seq_len, tokens.device,
                       score_logits=score_logits, on_update=on_update, rank=rank, world_size=world_size)
    result = run_ttt(model.model, tokens, ttt_config, score_chunk, plan.seq_len, tokens.device)
    if trace is not None:
        calls = iter(call_events)
        for kind, start, end in result.events:
            trace.events.extend(next(calls, []) if kind == "score" else [("update", np.arange(start, end))])
    return result


def all_reduce_totals(totals: dict[str, Totals], device) -> dict[str, Totals]:
    """Sum every scorer's totals across ranks in float64."""
    if not (dist.is_available() and dist.is_initialized()):
        return totals
    names = sorted(totals)
    sums = torch.tensor([[totals[n].nll_sum, totals[n].targets, totals[n].bytes] for n in names],
                        dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return {n: Totals(row[0], int(row[1]), int(row[2])) for n, row in zip(names, sums.tolist(), strict=True)}


def score_stream(
    model: EvalModel, tokens_np: np.ndarray, plan: EvalPlan, tables: ByteTables, device, *,
    ngram: list[NgramConfig | TiltConfig] = (), ttt_config: TTTConfig | None = None,
    rank: int = 0, world_size: int = 1, trace: Trace | None = None, progress=None,
) -> PassResult:
    """Score the stream once: model totals and one per n-gram grid point (with TTT: the adapting model's).

    Without TTT each rank scores a contiguous share of the windows (n-gram counts fast-forwarded over the
    earlier shares); batched TTT splits its document batches over the ranks; the other TTT modes run on rank 0
    alone, since their weights depend on every earlier chunk."""
    tokens = torch.from_numpy(np.asarray(tokens_np, dtype=np.int32)).to(device)
    scorer = Scorer(tokens, ByteCounter(tables, device), list(ngram), model.model.config.vocab_size, trace)
    started = time.perf_counter()
    ttt_result = None
    if ttt_config is None:
        scored_pass(model, tokens, tokens_np, plan, scorer, rank, world_size, progress)
    elif ttt_config.mode == "batched":
        ttt_result = ttt_pass(model, tokens, tokens_np, plan, scorer, ttt_config, progress, rank, world_size)
    elif rank == 0:
        ttt_result = ttt_pass(model, tokens, tokens_np, plan, scorer, ttt_config, progress)
    totals = all_reduce_totals(scorer.results(), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return PassResult(totals, ttt_result, time.perf_counter() - started)


def warm_up(model: EvalModel, vocab_size: int, seq_len: int, batch_seqs: int, device, steps: int = 2):
    """Run the forward on random tokens (never validation tokens) so compilation happens before the timed
    pass; returns the seconds it took."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.arange(batch_seqs * seq_len, device=device)
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            inputs = torch.randint(0, vocab_size, (batch_seqs, seq_len), generator=generator).to(device)
            model.logits_at(inputs, rows).sum().item()
    return time.perf_counter() - started
