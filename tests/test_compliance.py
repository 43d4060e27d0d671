"""C1-C4 on real runs: every legal mode passes, and each illegal variant the challenge has seen is caught."""

import copy
import dataclasses
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pgolf.model
import pgolf.scoring
from pgolf.compliance import check_compliance, check_eval, in_stream_order, require, trace_eval
from pgolf.errors import ComplianceError
from pgolf.ngram import NgramConfig, NgramMixer
from pgolf.scoring import EvalPlan, Trace, document_starts, ngram_name
from pgolf.shards import BOS_ID
from pgolf.ttt import TTTConfig, TTTResult, ttt_split

SEQ_LEN, STRIDE = 32, 8


@pytest.fixture(scope="module")
def prefix(tiny_eval_inputs):
    """The first 80 tokens of each of the first six val documents: real text, six document boundaries."""
    _, tokens, _ = tiny_eval_inputs
    starts = np.flatnonzero(tokens == BOS_ID)[:6]
    return np.concatenate([tokens[start : start + 80] for start in starts])


def results_of(tiny_eval_inputs, prefix, plan, **options) -> dict:
    model, _, tables = tiny_eval_inputs
    return {r.name.split()[0]: r for r in check_eval(model, prefix, plan, tables, **options)}


def assert_all_pass(results: dict) -> None:
    assert all(r.ok for r in results.values()), {name: r.detail for name, r in results.items() if not r.ok}
    require(list(results.values()))


@pytest.mark.parametrize("stride, doc_isolated", [(SEQ_LEN, False), (STRIDE, False), (STRIDE, True)],
                         ids=["flat", "sliding", "doc"])
def test_plain_modes_are_legal(tiny_eval_inputs, prefix, stride, doc_isolated):
    results = results_of(tiny_eval_inputs, prefix, EvalPlan(SEQ_LEN, stride, doc_isolated, 4))
    assert_all_pass(results)
    assert "479 targets scored exactly once" in results["C4"].detail


@pytest.mark.parametrize("grid", [
    [NgramConfig(5, 0.4, buckets=512)],
    [NgramConfig(order, alpha, "entropy", buckets=512) for order in (2, 4) for alpha in (0.3, 0.6)],
], ids=["one", "sweep"])
def test_ngram_cache_is_legal(tiny_eval_inputs, prefix, grid):
    results = results_of(tiny_eval_inputs, prefix, EvalPlan(SEQ_LEN, STRIDE, False, 4), ngram=grid)
    assert_all_pass(results)
    assert all(ngram_name(config) in results["C2"].detail for config in grid)


@pytest.mark.parametrize("mode", ["sgd", "lora"])
def test_score_first_ttt_is_legal(tiny_eval_inputs, prefix, mode):
    config = TTTConfig(mode=mode, chunk_tokens=96, epochs=1, batch_seqs=2, lora_rank=2, lr=0.01)
    results = results_of(tiny_eval_inputs, prefix, EvalPlan(SEQ_LEN, STRIDE, True, 4), ttt_config=config,
                         ngram=[NgramConfig(3, 0.3, buckets=256)])
    assert_all_pass(results)
    assert "(0 updates)" not in results["C3"].detail


class TargetKeyedMixer(NgramMixer):
    """The ruled-invalid cache: counts keyed by hash(context, target), p(v) = count(ctx, v) / count(ctx).
    Hash collisions and unseen contexts make the implied distribution sum to anything but 1."""

    def __init__(self, config, vocab_size, device):
        super().__init__(config, vocab_size, device)
        self.pair_counts = torch.zeros(config.buckets, dtype=torch.float64)
        self.context_counts = torch.zeros(config.buckets, dtype=torch.float64)

    def keys(self, tokens, positions):
        context = tokens[(positions - 1).clamp_min(0)].long()
        return context, (context * 1009 + tokens[positions].long() * 7919) % self.config.buckets

    def update(self, tokens, upto_position):
        positions = torch.arange(max(self.counted_upto, 1), upto_position)
        context, pair = self.keys(tokens, positions)
        self.pair_counts.index_add_(0, pair, torch.ones(len(pair), dtype=torch.float64))
        ones = torch.ones(len(pair), dtype=torch.float64)
        self.context_counts.index_add_(0, context % self.config.buckets, ones)
        self.counted_upto = upto_position

    def distributions(self, tokens, positions, orders, dtype=torch.float32):
        context = tokens[positions - 1].long()
        every_target = torch.arange(self.vocab_size)
        pair = (context[:, None] * 1009 + every_target[None, :] * 7919) % self.config.buckets
        seen = self.context_counts[context % self.config.buckets].clamp_min(1)
        implied = self.pair_counts[pair] / seen[:, None]
        return {order: implied.to(dtype) for order in orders}


def test_target_keyed_ngram_lookup_fails_c2(tiny_eval_inputs, prefix, monkeypatch):
    monkeypatch.setattr(pgolf.scoring, "NgramMixer", TargetKeyedMixer)
    results = results_of(tiny_eval_inputs, prefix, EvalPlan(SEQ_LEN, STRIDE, False, 4),
                         ngram=[NgramConfig(3, 0.4, buckets=97)])
    assert not results["C2"].ok
    assert "ngram3_a0.4" in results["C2"].detail and "sums to" in results["C2"].detail
    with pytest.raises(ComplianceError, match="C2 normalization failed") as error:
        require(list(results.values()))
    assert error.value.exit_code == 5


class RescoringPlan(EvalPlan):
    """A sliding window that scores every target of every window (the overlap scored again and again)."""

    def windows(self, tokens, first=1, last=None):
        windows = super().windows(tokens, first, last)
        windows[:, 1] = np.maximum(first, windows[:, 0] + 1)
        return windows


def test_sliding_window_that_rescores_fails_c4(tiny_eval_inputs, prefix):
    results = results_of(tiny_eval_inputs, prefix, RescoringPlan(SEQ_LEN, STRIDE, False, 4))
    assert not results["C4"].ok and "times" in results["C4"].detail
    assert results["C1"].ok and results["C2"].ok


class RightAlignedPlan(EvalPlan):
    """Each document's last window right-aligned to the document's end: more context for the tail, but where
    the next BOS falls (the future) decides how much context earlier targets get."""

    def windows(self, tokens, first=1, last=None):
        windows = super().windows(tokens, first, last)
        starts = document_starts(tokens, len(tokens) - 1)
        base = starts[np.searchsorted(starts, windows[:, 1] - 1, side="right") - 1]
        windows[:, 0] = np.maximum(base, windows[:, 2] - self.seq_len)
        return windows


def test_window_placed_by_a_future_document_boundary_fails_c1(tiny_eval_inputs, prefix):
    results = results_of(tiny_eval_inputs, prefix, RightAlignedPlan(SEQ_LEN, SEQ_LEN, True, 4))
    assert not results["C1"].ok and "changed when tokens after" in results["C1"].detail
    assert results["C4"].ok


def train_then_score(model, tokens, config, score_chunk, train_seq_len, device, progress=None):
    """TTT in the wrong order: each chunk is learned first, then scored (it logs that order honestly)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = TTTResult(nll=torch.zeros(0, dtype=torch.float64))
    parts = []
    for start, end in ttt_split(1, len(tokens), config.chunk_tokens):
        inputs, targets = tokens[start - 1 : end - 1].long()[None], tokens[start:end].long()[None]
        optimizer.zero_grad()
        F.cross_entropy(model.logits(inputs)[0], targets[0]).backward()
        optimizer.step()
        result.events.append(("update", start, end))
        with torch.no_grad():
            parts.append(score_chunk(model, tokens, start, end))
        result.events.append(("score", start, end))
    result.nll = torch.cat(parts)
    return result


def test_ttt_that_trains_before_scoring_fails_c1_and_c3(tiny_eval_inputs, prefix, monkeypatch):
    monkeypatch.setattr(pgolf.scoring, "run_ttt", train_then_score)
    results = results_of(tiny_eval_inputs, prefix, EvalPlan(SEQ_LEN, STRIDE, False, 4),
                         ttt_config=TTTConfig(mode="sgd", chunk_tokens=100))
    assert not results["C1"].ok and not results["C3"].ok
    assert "before it was scored" in results["C3"].detail
    with pytest.raises(ComplianceError, match="C1 causality failed"):
        require(list(results.values()))


def test_a_model_that_attends_to_the_future_fails_c1(tiny_eval_inputs, prefix, monkeypatch):
    def bidirectional(q, k, v, documents=None):
        group = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=False)

    monkeypatch.setattr(pgolf.model, "attend", bidirectional)
    results = results_of(tiny_eval_inputs, prefix, EvalPlan(SEQ_LEN, SEQ_LEN, False, 4))
    assert not results["C1"].ok and results["C2"].ok and results["C4"].ok


def test_cli_check_compliance_exits_5_on_an_illegal_cache(tiny_checkpoint_dir, tiny_data_dir, tmp_path,
                                                          monkeypatch, capsys):
    from pgolf.cli import main

    monkeypatch.setattr(pgolf.scoring, "NgramMixer", TargetKeyedMixer)
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", ["pgolf", "eval", str(tiny_checkpoint_dir), "--data", str(tiny_data_dir),
                                      "--ngram-order", "3", "--ngram-buckets", "97", "--check-compliance",
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 5
    assert "C2 normalization failed" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("prefix_docs", [4, 2000])
def test_phased_ttt_pauses_never_depend_on_later_documents(tiny_eval_inputs, prefix, prefix_docs):
    # 2000 > the prefix's six documents: pausing at fractions of the stream's total document count (the seeds'
    # rule) would let a BOS added after t move a pause before t; C1's dense-BOS perturbation catches that.
    config = TTTConfig(mode="phased", chunk_tokens=64, lora_rank=2, phases=2, prefix_docs=prefix_docs,
                       phase_lr=0.05)
    results = results_of(tiny_eval_inputs, prefix, EvalPlan(SEQ_LEN, STRIDE, False, 4), ttt_config=config)
    assert_all_pass(results)


# -------------------------------------------------------------------------------------------------------
# Out-of-order scoring: the records' length-sorted document batches (TTT mode batched)


@pytest.fixture(scope="module")
def uneven_prefix(tiny_eval_inputs):
    """Six real val documents cut to uneven lengths, so length-sorted batches leave the stream's order."""
    _, tokens, _ = tiny_eval_inputs
    starts = np.flatnonzero(tokens == BOS_ID)[:6]
    return np.concatenate([tokens[s : s + n] for s, n in zip(starts, (30, 70, 20, 55, 40, 25), strict=True)])


BATCHED = TTTConfig(mode="batched", chunk_tokens=16, lora_rank=2, lora_batch_docs=2, eval_seq_len=SEQ_LEN,
                    lr=0.01, prefix_docs=4, phases=2, phase_lr=0.05, batch_seqs=2)


def test_records_length_sorted_batched_ttt_is_legal(tiny_eval_inputs, uneven_prefix):
    model, _, tables = tiny_eval_inputs
    trace = trace_eval(copy.deepcopy(model).double(), uneven_prefix, EvalPlan(SEQ_LEN, STRIDE, False, 4), tables,
                       ttt_config=BATCHED)
    assert not in_stream_order(trace)  # the longest document is scored first
    results = results_of(tiny_eval_inputs, uneven_prefix, EvalPlan(SEQ_LEN, STRIDE, False, 4), ttt_config=BATCHED)
    assert_all_pass(results)
    assert "cut in scoring order" in results["C1"].detail and "(0 updates)" not in results["C3"].detail


def test_batched_ttt_on_a_single_document_is_checked_in_scoring_order(tiny_eval_inputs, prefix):
    # One document: the scores follow the stream, but the schedule still rests on document lengths.
    one_document = prefix[:80]
    results = results_of(tiny_eval_inputs, one_document, EvalPlan(SEQ_LEN, STRIDE, False, 4), ttt_config=BATCHED)
    assert_all_pass(results)
    assert "cut in scoring order" in results["C1"].detail


def test_batched_ttt_with_a_model_that_sees_the_future_fails_c1(tiny_eval_inputs, uneven_prefix, monkeypatch):
    def bidirectional(q, k, v, documents=None):
        group = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=False)

    monkeypatch.setattr(pgolf.model, "attend", bidirectional)
    results = results_of(tiny_eval_inputs, uneven_prefix, EvalPlan(SEQ_LEN, STRIDE, False, 4),
                         ttt_config=dataclasses.replace(BATCHED, epochs=0, prefix_docs=0))
    assert not results["C1"].ok and "not yet scored were perturbed" in results["C1"].detail
    assert results["C3"].ok and results["C4"].ok


def synthetic_run(order: list[list[int]], leak: int = 0, update_first: bool = False, twice: bool = False):
    """A run that scores `order`'s groups of targets in that order; the distribution of target p is a function
    of tokens[p - 1] (legal) or, with leak, of tokens[p + leak] too; events logged honestly."""
    vocab = 8

    def run(tokens: np.ndarray) -> Trace:
        trace = Trace()
        for group in order:
            positions = torch.tensor(group)
            if update_first:
                trace.events.append(("update", positions.numpy()))
            seen = torch.from_numpy(tokens[np.asarray(group) - 1] % vocab)
            if leak:
                seen = seen + torch.from_numpy(tokens[np.minimum(np.asarray(group) + leak, len(tokens) - 1)] % vocab)
            logprobs = torch.log_softmax(F.one_hot(seen % vocab, vocab).double(), dim=-1)
            nll = -logprobs.gather(1, torch.from_numpy(tokens[group] % vocab)[:, None])[:, 0]
            for _ in range(2 if twice else 1):
                trace.scored(positions)
                trace.record("model", nll, logprobs)
            if not update_first:
                trace.events.append(("update", positions.numpy()))
        return trace

    return run


# 17 tokens, BOS at 0, 6 and 11: documents scored shortest first, then the rest.
SYNTHETIC = np.array([1, 3, 4, 5, 6, 2, 1, 7, 3, 2, 4, 1, 5, 6, 7, 2, 3])
OUT_OF_ORDER = [[7, 8, 9, 10, 11], [12, 13, 14], [15, 16], [1, 2, 3], [4, 5, 6]]


def test_checker_accepts_any_score_first_order_and_catches_each_illegal_variant():
    results = {r.name.split()[0]: r for r in check_compliance(synthetic_run(OUT_OF_ORDER), SYNTHETIC, 8)}
    assert all(r.ok for r in results.values()), results
    leak = {r.name.split()[0]: r for r in check_compliance(synthetic_run(OUT_OF_ORDER, leak=1), SYNTHETIC, 8)}
    assert not leak["C1"].ok and leak["C3"].ok and leak["C4"].ok
    early = {r.name.split()[0]: r for r in check_compliance(synthetic_run(OUT_OF_ORDER, update_first=True),
                                                             SYNTHETIC, 8)}
    assert not early["C3"].ok and "before it was scored" in early["C3"].detail
    twice = {r.name.split()[0]: r for r in check_compliance(synthetic_run(OUT_OF_ORDER, twice=True), SYNTHETIC, 8)}
    assert not twice["C4"].ok and "scored 2 times" in twice["C4"].detail


def test_batched_ttt_guards_refuse_double_scores_and_early_updates(monkeypatch):
    import pgolf.ttt as batched
    from pgolf.ttt import run_ttt

    model = pgolf.model.GPT(pgolf.model.ModelConfig(vocab_size=16, num_layers=2, model_dim=8, num_heads=2,
                                                    num_kv_heads=1, max_seq_len=32)).double()
    tokens = torch.tensor([1, 3, 4, 5, 6, 2, 7, 8, 9, 3, 1, 5, 6, 7, 2, 3, 4, 5, 6, 7])
    config = TTTConfig(mode="batched", chunk_tokens=4, lora_rank=2, prefix_docs=0, eval_seq_len=8)
    original = batched.chunk_window
    monkeypatch.setattr(batched, "chunk_window", lambda ci, *rest: (lambda w: (w[0], w[1], w[2] - (ci > 0),
                                                                               w[3] + (ci > 0)))(original(ci, *rest)))
    with pytest.raises(ComplianceError, match="twice"):
        run_ttt(model, tokens, config, None, 8, "cpu")
    monkeypatch.setattr(batched, "chunk_window", original)
    monkeypatch.setattr(batched, "document_rows", lambda spans, seq_len: [])
    early = batched.ttt_batch

    def update_then_score(session, adapted, optimizer, spans, window, clock, score, update):
        update(spans[0][0], spans[0][1])
        early(session, adapted, optimizer, spans, window, clock, score, update)

    monkeypatch.setattr(batched, "ttt_batch", update_then_score)
    with pytest.raises(ComplianceError, match="before scoring"):
        run_ttt(model, tokens, config, None, 8, "cpu")
