"""The challenge's legality conditions (REFERENCE.md, "Legal evaluation"), checked on a real run of an eval.

The eval runs on a short token prefix in float64 on the CPU (a copy of the model; the scored pass is
untouched) with the same plan, n-gram grid and TTT settings, recording every score, every full distribution
and every score/update event (pgolf.scoring.Trace). Then:
- C1 causality: for several cut points t the tokens after t are replaced by random ones (a BOS at t + 1,
  then sparse to dense BOSes) and the run repeated; every score and distribution of the targets at
  positions <= t must be bit-identical. A run that scores out of stream order (the records' length-sorted
  document batches) is cut in scoring order instead: at several score events k, every token not yet
  revealed (neither scored by an earlier event nor among the first half of event k's targets) is replaced
  by a random non-BOS token, BOS positions (the document structure the order is built from) held fixed, and
  the scores of the revealed targets must be bit-identical: a score may use its own document's earlier
  tokens and weights trained on scored targets, nothing else. A run that schedules by documents
  (Trace.by_documents) gets this check even where its order happens to follow the stream.
- C2 normalization: every distribution used for a score (model and each n-gram mixture) covers the whole
  vocabulary and sums to 1 within 1e-6.
- C3 score before update: every position an update uses (n-gram counts, TTT weights) was scored before it;
  position 0, the stream's opening BOS, is never a target and is given.
- C4 single pass: each target 1..N-1 is scored exactly once.
"""

import copy
from dataclasses import dataclass

import numpy as np
import torch

from pgolf.bpb import ByteTables
from pgolf.errors import ComplianceError
from pgolf.ngram import NgramConfig, TiltConfig
from pgolf.scoring import EvalModel, EvalPlan, Trace, score_stream
from pgolf.shards import BOS_ID
from pgolf.ttt import TTTConfig

COMPLIANCE_SUM_TOLERANCE = 1e-6
# One C1 cut point per entry, spread over the prefix; the perturbation after each puts a BOS at t + 1 and
# about one in this many tokens after it: boundaries that move, and (dense) many more documents.
COMPLIANCE_BOS_EVERY = (1000, 50, 4)


@dataclass
class CheckResult:
    name: str  # "C1 causality", ...
    ok: bool
    detail: str


def trace_eval(model, tokens: np.ndarray, plan: EvalPlan, tables: ByteTables,
               ngram: list[NgramConfig | TiltConfig] = (), ttt_config: TTTConfig | None = None) -> Trace:
    """One traced run of the eval on `tokens`, on the CPU in the model's dtype (the caller's float64 copy)."""
    trace = Trace()
    score_stream(EvalModel(model), tokens, plan, tables, torch.device("cpu"), ngram=ngram, ttt_config=ttt_config,
             trace=trace)
    return trace


def check_normalized(trace: Trace, vocab_size: int) -> CheckResult:
    """C2 over every scorer's distributions."""
    for name in trace.logprobs:
        positions, _, logprobs = trace.scores(name)
        if logprobs.shape[-1] != vocab_size:
            return CheckResult("C2 normalization", False, f"{name}: distributions cover {logprobs.shape[-1]} "
                               f"of the {vocab_size} tokens")
        error = (logprobs.double().exp().sum(-1) - 1).abs()
        error = torch.where(torch.isnan(error), torch.inf, error)
        if len(error) and float(error.max()) > COMPLIANCE_SUM_TOLERANCE:
            worst = int(error.argmax())
            total = float(logprobs[worst].double().exp().sum())
            return CheckResult("C2 normalization", False, f"{name}: the distribution for target "
                               f"{int(positions[worst])} sums to {total:.9g}, not 1 (tolerance "
                               f"{COMPLIANCE_SUM_TOLERANCE:g})")
    names = ", ".join(trace.logprobs)
    return CheckResult("C2 normalization", True, f"{names}: every distribution sums to 1 within "
                       f"{COMPLIANCE_SUM_TOLERANCE:g}")


def check_events(trace: Trace, n_tokens: int) -> list[CheckResult]:
    """C3 (updates use only scored positions) and C4 (each target scored exactly once) from the event log."""
    times_scored = np.zeros(n_tokens, dtype=np.int64)
    c3 = CheckResult("C3 score before update", True, "every update used only already-scored targets")
    updates = 0
    for kind, positions in trace.events:
        if kind == "score":
            np.add.at(times_scored, positions, 1)
            continue
        updates += 1
        unscored = positions[(positions != 0) & (times_scored[positions] == 0)]
        if c3.ok and unscored.size:
            c3 = CheckResult("C3 score before update", False, f"an update used target {int(unscored[0])} "
                             f"before it was scored")
    if c3.ok:
        c3.detail += f" ({updates} updates)"
    twice = np.flatnonzero(times_scored[1:] > 1) + 1
    never = np.flatnonzero(times_scored[1:] == 0) + 1
    if twice.size:
        c4 = CheckResult("C4 single pass", False, f"target {int(twice[0])} was scored "
                         f"{int(times_scored[twice[0]])} times ({twice.size} targets scored more than once)")
    elif never.size:
        c4 = CheckResult("C4 single pass", False, f"target {int(never[0])} was never scored "
                         f"({never.size} targets missing)")
    elif times_scored[0]:
        c4 = CheckResult("C4 single pass", False, "position 0 (the opening BOS) was scored as a target")
    else:
        c4 = CheckResult("C4 single pass", True, f"each of the {n_tokens - 1} targets scored exactly once")
    return [c3, c4]


def perturb_after(tokens: np.ndarray, cut: int, vocab_size: int, generator: np.random.Generator,
                  bos_every: int) -> np.ndarray:
    """Tokens after position `cut` replaced by random ones that differ from the originals, about one in
    `bos_every` of them BOS, and always the first (a document that ends exactly at the cut)."""
    perturbed = tokens.copy()
    count = len(tokens) - cut - 1
    fresh = (tokens[cut + 1 :] + generator.integers(1, vocab_size, count)) % vocab_size
    fresh[generator.random(count) < 1 / bos_every] = BOS_ID
    fresh[:1] = BOS_ID
    perturbed[cut + 1 :] = fresh
    return perturbed


def scores_up_to(trace: Trace, name: str, cut: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    positions, nll, logprobs = trace.scores(name)
    keep = positions <= cut
    return positions[keep], nll[torch.from_numpy(keep)], logprobs[torch.from_numpy(keep)]


def check_causal(run, tokens: np.ndarray, base: Trace, vocab_size: int, cuts: list[int], seed: int = 0):
    """C1: the scores and distributions at positions <= t survive any change after t, bit for bit."""
    generator = np.random.default_rng(seed)
    for cut, bos_every in zip(cuts, COMPLIANCE_BOS_EVERY, strict=True):
        perturbed = run(perturb_after(tokens, cut, vocab_size, generator, bos_every))
        for name in base.nll:
            positions, nll, logprobs = scores_up_to(base, name, cut)
            new_positions, new_nll, new_logprobs = scores_up_to(perturbed, name, cut)
            if not np.array_equal(positions, new_positions):
                return CheckResult("C1 causality", False, f"{name}: which targets <= {cut} are scored "
                                   f"changed when tokens after {cut} were perturbed")
            changed = np.flatnonzero(((nll != new_nll) | (logprobs != new_logprobs).any(-1)).numpy())
            if changed.size:
                target = int(positions[changed[0]])
                return CheckResult("C1 causality", False, f"{name}: the score of target {target} changed "
                                   f"when tokens after {cut} were perturbed ({changed.size} targets <= {cut} "
                                   f"changed)")
    return CheckResult("C1 causality", True, f"scores at <= t bit-identical under perturbation after t for "
                       f"t in {cuts}")


def score_events(trace: Trace) -> list[np.ndarray]:
    return [positions for kind, positions in trace.events if kind == "score"]


def in_stream_order(trace: Trace) -> bool:
    """Whether every score event's targets come after every earlier event's (the plain and chunked modes)."""
    last = 0
    for positions in score_events(trace):
        if len(positions) == 0:
            continue
        if np.any(np.diff(positions) < 0) or positions.min() < last:
            return False
        last = int(positions.max())
    return True


def perturb_unrevealed(tokens: np.ndarray, revealed: np.ndarray, vocab_size: int,
                       generator: np.random.Generator) -> np.ndarray:
    """Every token neither revealed, nor BOS, nor position 0 replaced by a different random non-BOS token."""
    keep = revealed.copy()
    keep[0] = True
    keep |= tokens == BOS_ID
    change = np.flatnonzero(~keep)
    fresh = (tokens[change] + generator.integers(1, vocab_size, len(change))) % vocab_size
    for _ in range(2):  # step off BOS, and off the original if that step landed on it
        fresh = np.where((fresh == BOS_ID) | (fresh == tokens[change]), (fresh + 1) % vocab_size, fresh)
    perturbed = tokens.copy()
    perturbed[change] = fresh
    return perturbed


def check_causal_reordered(run, tokens: np.ndarray, base: Trace, vocab_size: int, seed: int = 0):
    """C1 for a run that scores out of stream order: cut in scoring order, BOS positions fixed."""
    generator = np.random.default_rng(seed)
    events = score_events(base)
    cut_count = len(COMPLIANCE_BOS_EVERY)
    cuts = sorted({len(events) * (i + 1) // (cut_count + 1) for i in range(cut_count)})
    base_scores = {name: base.scores(name) for name in base.nll}
    for k in cuts:
        current = np.sort(events[k])
        shown = np.concatenate([*events[:k], current[: (len(current) + 1) // 2]]).astype(np.int64)
        revealed = np.zeros(len(tokens), dtype=bool)
        revealed[shown] = True
        perturbed = run(perturb_unrevealed(tokens, revealed, vocab_size, generator))
        for name, (positions, nll, logprobs) in base_scores.items():
            new_positions, new_nll, new_logprobs = perturbed.scores(name)
            keep = revealed[positions]
            if not np.array_equal(np.sort(positions[keep]), np.sort(new_positions[revealed[new_positions]])):
                return CheckResult("C1 causality", False, f"{name}: which targets are scored by the first {k} "
                                   f"score events changed when unrevealed tokens were perturbed")
            order, new_order = np.argsort(positions[keep], kind="stable"), \
                np.argsort(new_positions[revealed[new_positions]], kind="stable")
            old_nll, old_lp = nll[torch.from_numpy(keep)][order], logprobs[torch.from_numpy(keep)][order]
            new_keep = torch.from_numpy(revealed[new_positions])
            new_nll, new_lp = new_nll[new_keep][new_order], new_logprobs[new_keep][new_order]
            changed = np.flatnonzero(((old_nll != new_nll) | (old_lp != new_lp).any(-1)).numpy())
            if changed.size:
                target = int(np.sort(positions[keep])[changed[0]])
                return CheckResult("C1 causality", False, f"{name}: the score of target {target} changed when "
                                   f"tokens not yet scored were perturbed (cut after score event {k}, "
                                   f"{changed.size} revealed targets changed)")
    return CheckResult("C1 causality", True, f"cut in scoring order: scores of revealed targets bit-identical "
                       f"under perturbation of every unrevealed token (BOS positions fixed) at score events "
                       f"{cuts}")


def check_compliance(run, tokens: np.ndarray, vocab_size: int, seed: int = 0) -> list[CheckResult]:
    """C1-C4 for `run(tokens) -> Trace`, an eval traced on a token prefix."""
    tokens = np.asarray(tokens, dtype=np.int64)
    base = run(tokens)
    if in_stream_order(base) and not base.by_documents:
        cut_count = len(COMPLIANCE_BOS_EVERY)
        cuts = [len(tokens) * (i + 1) // (cut_count + 1) for i in range(cut_count)]
        causal = check_causal(run, tokens, base, vocab_size, cuts, seed)
    else:
        causal = check_causal_reordered(run, tokens, base, vocab_size, seed)
    return [causal, check_normalized(base, vocab_size), *check_events(base, len(tokens))]


def check_eval(model, tokens: np.ndarray, plan: EvalPlan, tables: ByteTables,
               ngram: list[NgramConfig | TiltConfig] = (), ttt_config: TTTConfig | None = None,
               seed: int = 0) -> list[CheckResult]:
    """C1-C4 for this eval (plan, n-gram grid, TTT) on a float64 CPU copy of the model."""
    model64 = copy.deepcopy(model).to("cpu", torch.float64).eval()
    run = lambda prefix: trace_eval(model64, prefix, plan, tables, ngram, ttt_config)
    return check_compliance(run, tokens, model.config.vocab_size, seed)


def require(results: list[CheckResult]) -> None:
    """Raise ComplianceError (exit 5) naming the first failed condition."""
    for result in results:
        if not result.ok:
            raise ComplianceError(f"{result.name} failed: {result.detail}")
