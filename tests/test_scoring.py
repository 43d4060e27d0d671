"""Scoring a real (tiny, trained) model on real val shards: exact totals in every mode, n-gram sweeps from one
pass, rank shares, TTT."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.errors import ComplianceError
from pgolf.evaluate import EvalConfig
from pgolf.ngram import NgramConfig, NgramMixer
from pgolf.scoring import (
    ByteCounter,
    EvalModel,
    EvalPlan,
    NgramSweep,
    Scorer,
    gold_nll,
    iter_logprobs,
    ngram_name,
    score,
    score_stream,
    scored_pass,
)
from pgolf.shards import BOS_ID
from pgolf.ttt import TTTConfig
from tests.demo_data import TOKENIZER_NAME, demo_splits

SEQ_LEN = 128
CPU = torch.device("cpu")


def evaluate(model, tokens, tables, stride=SEQ_LEN, doc_isolated=False, **options):
    plan = EvalPlan(SEQ_LEN, stride, doc_isolated, batch_seqs=16)
    return score_stream(EvalModel(model), tokens, plan, tables, CPU, **options)


def per_target(model, tokens, stride, doc_isolated=False):
    """NLL of every target 1..N-1 (float64) under a plan."""
    plan = EvalPlan(SEQ_LEN, stride, doc_isolated, batch_seqs=16)
    return score(model, torch.from_numpy(tokens), plan.windows(tokens), SEQ_LEN, 16).double()


def test_flat_is_the_challenges_eval_val_plus_the_tail(tiny_eval_inputs):
    model, tokens, tables = tiny_eval_inputs
    flat = evaluate(model, tokens, tables).totals["model"]
    assert flat.targets == len(tokens) - 1
    # The challenge's eval_val on the same tokens: model(x, y) mean loss per chunk, tail dropped.
    usable = (len(tokens) - 1) // SEQ_LEN * SEQ_LEN
    stream = torch.from_numpy(tokens[: usable + 1])
    x, y = stream[:-1].reshape(-1, SEQ_LEN), stream[1:].reshape(-1, SEQ_LEN)
    with torch.inference_mode():
        challenge_sum = sum(float(model(x[i : i + 16], y[i : i + 16])) * y[i : i + 16].numel()
                            for i in range(0, len(x), 16))
    nll = per_target(model, tokens, SEQ_LEN)
    assert float(nll[:usable].sum()) == pytest.approx(challenge_sum, rel=1e-6)
    assert flat.nll_sum == pytest.approx(float(nll.sum()), rel=1e-12)
    assert len(tokens) - 1 - usable > 0  # the fixture has a tail, and it is scored


def test_stride_equal_to_seq_len_equals_flat_exactly(tiny_eval_inputs):
    model, tokens, tables = tiny_eval_inputs
    flat_config, sliding_config = EvalConfig(), EvalConfig(sliding_stride=SEQ_LEN)
    flat = per_target(model, tokens, flat_config.stride(SEQ_LEN))
    sliding = per_target(model, tokens, sliding_config.stride(SEQ_LEN))
    assert torch.equal(flat, sliding)
    # An independent chunked computation: non-overlapping windows, a short one for the tail.
    stream = torch.from_numpy(tokens)
    with torch.inference_mode():
        chunks = []
        for start in range(0, len(tokens) - 1, SEQ_LEN):
            end = min(start + SEQ_LEN, len(tokens) - 1)
            logits = model.logits(stream[start:end][None])[0]
            chunks.append(F.cross_entropy(logits, stream[start + 1 : end + 1], reduction="none"))
    torch.testing.assert_close(flat, torch.cat(chunks).double(), rtol=0, atol=1e-5)


def test_sliding_scores_each_target_once_and_beats_flat(tiny_eval_inputs):
    model, tokens, tables = tiny_eval_inputs
    flat = evaluate(model, tokens, tables).totals["model"]
    sliding = evaluate(model, tokens, tables, stride=32).totals["model"]
    assert sliding.targets == flat.targets == len(tokens) - 1
    assert sliding.bytes == flat.bytes
    assert sliding.val_bpb < flat.val_bpb
    # Targets with the same context in both plans score identically: the first window's.
    assert torch.equal(per_target(model, tokens, 32)[:SEQ_LEN], per_target(model, tokens, SEQ_LEN)[:SEQ_LEN])


def test_doc_isolated_scores_ignore_the_previous_document(tiny_eval_inputs):
    model, tokens, _ = tiny_eval_inputs
    bos = np.flatnonzero(tokens == BOS_ID)
    assert len(bos) >= 5
    changed = tokens.copy()
    previous = slice(bos[2] + 1, bos[3])  # the inside of document 2
    changed[previous] = np.random.default_rng(0).integers(3, 1024, previous.stop - previous.start)
    later = slice(bos[3], None)  # targets at positions > document 3's BOS (index = position - 1)
    isolated, isolated_changed = per_target(model, tokens, 32, True), per_target(model, changed, 32, True)
    assert torch.equal(isolated[later], isolated_changed[later])
    # Without isolation the same change does reach the next document's first targets.
    plain, plain_changed = per_target(model, tokens, 32), per_target(model, changed, 32)
    assert not torch.equal(plain[later][:SEQ_LEN], plain_changed[later][:SEQ_LEN])


def test_bytes_are_the_decoded_utf8_of_the_val_documents(tiny_eval_inputs, tiny_data_dir):
    import json

    from pgolf.bpb import load_tokenizer

    model, tokens, tables = tiny_eval_inputs
    totals = evaluate(model, tokens, tables, stride=64, doc_isolated=True).totals["model"]
    sp = load_tokenizer(tiny_data_dir / TOKENIZER_NAME)
    manifest = json.loads((tiny_data_dir / "manifest.json").read_text())
    documents = demo_splits()[0]
    assert totals.bytes == tables.count_bytes(tokens) == manifest["metrics"]["val"]["bytes"]
    assert totals.bytes == sum(len(sp.decode(sp.encode(text)).encode("utf-8")) for text in documents)
    assert totals.val_bpb == pytest.approx(totals.nll_sum / (math.log(2) * totals.bytes))
    assert totals.val_loss == pytest.approx(totals.nll_sum / (len(tokens) - 1))


def test_head_on_scored_rows_is_gpt_logits(tiny_eval_inputs):
    model, tokens, _ = tiny_eval_inputs
    inputs = torch.from_numpy(tokens[: 2 * SEQ_LEN]).reshape(2, SEQ_LEN)
    rows = torch.tensor([0, 5, 127, 200, 255])
    with torch.inference_mode():
        expected = model.logits(inputs).reshape(-1, model.config.vocab_size)[rows]
        assert torch.equal(EvalModel(model).logits_at(inputs, rows), expected)


def test_logprob_chunks_agree_with_score(tiny_eval_inputs):
    model, tokens, _ = tiny_eval_inputs
    stream = torch.from_numpy(tokens)
    windows = EvalPlan(SEQ_LEN, 48, False, 8).windows(tokens)
    chunks = list(iter_logprobs(model, stream, windows, SEQ_LEN, 8))
    positions = torch.cat([p for p, _ in chunks])
    assert torch.equal(positions, torch.arange(1, len(tokens)))
    nll = torch.cat([F.nll_loss(lp, stream[p], reduction="none") for p, lp in chunks])
    torch.testing.assert_close(nll, score(model, stream, windows, SEQ_LEN, 8), rtol=1e-6, atol=1e-6)
    assert all(torch.allclose(lp.exp().sum(-1), torch.ones(len(lp))) for _, lp in chunks)


def test_a_sweep_gives_each_point_what_a_separate_run_gives(tiny_eval_inputs):
    model, tokens, tables = tiny_eval_inputs
    tokens = tokens[:6000]
    grid = [NgramConfig(order, alpha, mode, buckets=4096) for order, alpha, mode in
            ((3, 0.2, "fixed"), (5, 0.2, "fixed"), (5, 0.6, "entropy"), (2, 0.4, "fixed"))]
    sweep = evaluate(model, tokens, tables, stride=64, ngram=grid).totals
    model_only = sweep["model"]
    for config in grid:
        alone = evaluate(model, tokens, tables, stride=64, ngram=[config]).totals
        assert alone["model"] == model_only
        assert sweep[ngram_name(config)].nll_sum == pytest.approx(alone[ngram_name(config)].nll_sum, rel=1e-9)
    # The cache helps on real text (repeated names, numbers and phrases).
    assert min(sweep[ngram_name(c)].val_bpb for c in grid) < model_only.val_bpb


def test_sweep_points_are_ngram_mixer_mix_exactly(tiny_eval_inputs):
    model, tokens, _ = tiny_eval_inputs
    stream = torch.from_numpy(tokens[:3000].astype(np.int32))
    vocab = model.config.vocab_size
    grid = [NgramConfig(order, alpha, mode, buckets=512) for order, alpha, mode in
            ((2, 0.3, "fixed"), (4, 0.5, "entropy"), (4, 0.1, "fixed"))]
    sweep = NgramSweep(grid, vocab, CPU)
    mixers = [NgramMixer(config, vocab, CPU) for config in grid]
    windows = EvalPlan(SEQ_LEN, 64, False, 8).windows(tokens[:3000])
    for positions, logprobs in iter_logprobs(model, stream, windows, SEQ_LEN, 8):
        scored, _ = sweep.score(stream, positions, logprobs)
        traced, mixed = sweep.score(stream, positions, logprobs, keep_distributions=True)
        for index, mixer in enumerate(mixers):
            expected = mixer.mix(stream, positions, logprobs)
            assert torch.equal(mixed[index], expected)
            assert torch.equal(scored[index], gold_nll(expected, stream, positions))
            assert torch.equal(traced[index], scored[index])
            mixer.update(stream, int(positions.max()) + 1)
        sweep.update(stream, int(positions.max()) + 1)
    with pytest.raises(ComplianceError, match="C3"):
        sweep.score(stream, positions, logprobs)  # these targets are counted now


def test_rank_shares_sum_to_one_process(tiny_eval_inputs):
    model, tokens, tables = tiny_eval_inputs
    tokens = tokens[:8000]
    grid = [NgramConfig(4, 0.3, buckets=1024)]
    plan = EvalPlan(SEQ_LEN, 64, False, 16)
    stream = torch.from_numpy(tokens.astype(np.int32))
    single = evaluate(model, tokens, tables, stride=64, ngram=grid).totals
    shares = []
    for rank in range(3):
        scorer = Scorer(stream, ByteCounter(tables, CPU), grid, model.config.vocab_size)
        scored_pass(EvalModel(model), stream, tokens, plan, scorer, rank, 3)
        shares.append(scorer.results())
    for name, totals in single.items():
        assert sum(share[name].targets for share in shares) == totals.targets
        assert sum(share[name].bytes for share in shares) == totals.bytes
        assert sum(share[name].nll_sum for share in shares) == pytest.approx(totals.nll_sum, rel=1e-12)


@pytest.mark.parametrize("mode", ["sgd", "lora"])
def test_ttt_scores_every_target_once_through_the_eval_plan(tiny_eval_inputs, mode):
    model, tokens, tables = tiny_eval_inputs
    tokens = tokens[:3000]
    config = TTTConfig(mode=mode, chunk_tokens=512, epochs=1, batch_seqs=4, lora_rank=4)
    result = evaluate(model, tokens, tables, stride=64, ttt_config=config,
                      ngram=[NgramConfig(3, 0.3, buckets=1024)])
    totals = result.totals
    assert totals["model"].targets == len(tokens) - 1
    assert totals["model"].bytes == tables.count_bytes(tokens)
    # TTT's own record of the scores it was handed (the n-gram mixture's, the primary scorer) matches ours.
    assert float(result.ttt.nll.sum()) == pytest.approx(totals[ngram_name(NgramConfig(3, 0.3, buckets=1024))]
                                                        .nll_sum, rel=1e-9)
    assert result.ttt.steps > 0
    frozen = evaluate(model, tokens, tables, stride=64).totals["model"]
    assert totals["model"].nll_sum != frozen.nll_sum  # the adapted weights scored the later chunks
