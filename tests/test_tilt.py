"""The token tilt (04-09's causal tilt, PR #2135's token-only gates): every tilted row is a full distribution
(C2), the hint and its gates read prefix counts only, it sweeps beside the n-gram cache from one pass, and
`pgolf eval` runs it legally. A gate that looks at the realized token is shown to fail C2.

Model and data: the session's tiny GPT trained on docs-200 (tests/conftest.py) and its real sp1024 val split."""

import json
import sys

import numpy as np
import pytest
import torch

import pgolf.scoring
from pgolf.compliance import check_eval, require
from pgolf.errors import ComplianceError
from pgolf.ngram import NgramConfig, NgramMixer, TiltConfig, tilt_gold_nll, tilt_hints, tilt_logprobs
from pgolf.scoring import EvalModel, EvalPlan, NgramSweep, ngram_name, score_stream
from tests.test_scoring import iter_logprobs

CPU = torch.device("cpu")
SEQ_LEN = 128


def counted_mixer(sequence: list[int], order: int, vocab: int = 16) -> tuple[NgramMixer, torch.Tensor]:
    stream = torch.tensor(sequence)
    mixer = NgramMixer(NgramConfig(order, buckets=1 << 12), vocab, CPU)
    mixer.update(stream, len(stream) - 1)  # everything but the last token, whose target is scored next
    return mixer, stream


def test_the_hint_is_the_longest_context_that_passes_both_gates():
    # "3 4" was followed by 5 twice and 6 once; "2 3 4" only ever by 6; "4" (order 2) by 5, 6, 5.
    # The target is the token after the last "2 3 4" (9, never counted).
    sequence = [1, 3, 4, 5, 3, 4, 5, 2, 3, 4, 6, 2, 3, 4, 9]
    mixer, stream = counted_mixer(sequence, order=4)
    target = torch.tensor([len(sequence) - 1])

    def hint(**gates):
        config = TiltConfig(buckets=1 << 12, **gates)
        hints, has_hint = tilt_hints(config, mixer.followers(stream, target, range(2, config.order + 1)))
        return int(hints[0]) if bool(has_hint[0]) else None

    assert hint(order=4, threshold=1.0, min_count=1) == 6  # "2 3 4" -> 6, once, share 1
    assert hint(order=4, threshold=1.0, min_count=2) is None  # no context seen twice with one follower only
    assert hint(order=3, threshold=0.6, min_count=2) == 5  # "3 4": 5 twice of three, share 2/3
    assert hint(order=3, threshold=0.7, min_count=2) is None


@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_every_tilted_row_is_a_full_distribution_and_scores_its_gold(gamma):
    generator = torch.Generator().manual_seed(0)
    vocab, n = 64, 300
    logprobs = torch.log_softmax(3 * torch.randn(n, vocab, generator=generator, dtype=torch.float64), -1)
    top = torch.randint(vocab, (n,), generator=generator)
    counts = torch.randint(0, 5, (n,), generator=generator)
    followers = {k: (top, counts, counts + k - 2) for k in range(2, 5)}
    gold = torch.where(torch.rand(n, generator=generator) < 0.5, top, torch.randint(vocab, (n,), generator=generator))
    config = TiltConfig(order=4, boost=2.5, threshold=0.6, min_count=2, gamma=gamma)
    tilted = tilt_logprobs(config, logprobs, followers)
    torch.testing.assert_close(tilted.exp().sum(-1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(tilt_gold_nll(config, logprobs, gold, followers), -tilted.gather(1, gold[:, None])[:, 0],
                               rtol=0, atol=1e-12)
    _, has_hint = tilt_hints(config, followers)
    assert 0 < int(has_hint.sum()) < n  # some targets are tilted, the rest keep the model's row exactly
    assert torch.equal(tilted[~has_hint], logprobs[~has_hint])
    untouched = tilt_logprobs(TiltConfig(order=4, boost=0.0), logprobs, followers)
    torch.testing.assert_close(untouched, logprobs, rtol=0, atol=0)


def test_sweep_tilt_points_score_what_their_full_rows_give(tiny_eval_inputs):
    model, tokens, _ = tiny_eval_inputs
    stream = torch.from_numpy(tokens[:2500].astype(np.int32))
    grid = [NgramConfig(3, 0.3, buckets=512), TiltConfig(4, 1.0, 0.5, buckets=512),
            TiltConfig(2, 2.0, 0.3, 3, gamma=1.0, buckets=512)]
    sweep = NgramSweep(grid, model.config.vocab_size, CPU)
    windows = EvalPlan(SEQ_LEN, 64, False, 8).windows(tokens[:2500])
    tilted_targets = 0
    for positions, logprobs in iter_logprobs(model, stream, windows, SEQ_LEN, 8):
        scored, _ = sweep.score(stream, positions, logprobs)
        traced, rows = sweep.score(stream, positions, logprobs, keep_distributions=True)
        for index in range(len(grid)):
            assert torch.equal(traced[index], scored[index])
            gold = stream[positions].long()[:, None]
            torch.testing.assert_close(scored[index], -rows[index].gather(1, gold)[:, 0], rtol=1e-6, atol=1e-6)
        tilted_targets += int((rows[1] != logprobs).any(-1).sum())
        sweep.update(stream, int(positions.max()) + 1)
    assert tilted_targets > 100  # the gates open on real text once its contexts repeat


def test_a_sweep_gives_each_tilt_point_what_a_separate_run_gives(tiny_eval_inputs):
    model, tokens, tables = tiny_eval_inputs
    tokens = tokens[:6000]
    plan = EvalPlan(SEQ_LEN, 64, False, 16)
    grid = [NgramConfig(4, 0.3, buckets=2048)] + [TiltConfig(order, boost, 0.5, buckets=2048)
                                                  for order in (3, 6) for boost in (0.5, 1.5)]
    swept = score_stream(EvalModel(model), tokens, plan, tables, CPU, ngram=grid).totals
    for config in grid[1:3]:
        alone = score_stream(EvalModel(model), tokens, plan, tables, CPU, ngram=[config]).totals
        assert alone["model"] == swept["model"]
        assert swept[ngram_name(config)].nll_sum == pytest.approx(alone[ngram_name(config)].nll_sum, rel=1e-9)
    # A hint from repeated names, numbers and phrases helps the tiny model on real text.
    assert min(swept[ngram_name(c)].val_bpb for c in grid[1:]) < swept["model"].val_bpb


@pytest.fixture(scope="module")
def prefix(tiny_eval_inputs):
    """The first 80 tokens of each of the first six val documents (as tests/test_compliance.py)."""
    _, tokens, _ = tiny_eval_inputs
    starts = np.flatnonzero(tokens == 1)[:6]
    return np.concatenate([tokens[start : start + 80] for start in starts])


def test_tilt_sweep_is_legal(tiny_eval_inputs, prefix):
    model, _, tables = tiny_eval_inputs
    grid = [TiltConfig(order, 2.0, 0.3, 1, buckets=97) for order in (2, 5)] + [NgramConfig(3, 0.4, buckets=97)]
    results = check_eval(model, prefix, EvalPlan(32, 8, False, 4), tables, ngram=grid)
    assert all(result.ok for result in results), [result.detail for result in results if not result.ok]
    c2 = next(result for result in results if result.name.startswith("C2"))
    assert all(ngram_name(config) in c2.detail for config in grid)


def peeking_rows(config, model_logprobs, followers):
    """The #1967 lineage's within-word gate, reduced: tilt only where the realized token agrees with the hint.
    Its implied distribution (each candidate v scored as if it were the target) gives every v != hint the
    model's p(v) and the hint the tilted p'(h): it sums to more than 1."""
    hint, has_hint = tilt_hints(config, followers)
    hint_logprob = model_logprobs.gather(1, hint[:, None])[:, 0]
    boost = torch.where(has_hint, torch.full_like(hint_logprob, config.boost), 0.0)
    tilted_hint = hint_logprob + boost - torch.log1p(hint_logprob.exp() * torch.expm1(boost))
    return model_logprobs.scatter(1, hint[:, None], tilted_hint[:, None])


def test_a_gate_that_looks_at_the_realized_token_fails_c2(tiny_eval_inputs, prefix, monkeypatch):
    monkeypatch.setattr(pgolf.scoring, "tilt_logprobs", peeking_rows)
    model, _, tables = tiny_eval_inputs
    results = check_eval(model, prefix, EvalPlan(32, 8, False, 4), tables,
                         ngram=[TiltConfig(3, 3.0, 0.3, 1, buckets=97)])
    c2 = next(result for result in results if result.name.startswith("C2"))
    assert not c2.ok and "tilt3_b3_t0.3_m1" in c2.detail and "sums to" in c2.detail
    with pytest.raises(ComplianceError, match="C2 normalization failed"):
        require(results)


@pytest.mark.parametrize("field, value", [("order", 1), ("order", 17), ("boost", -0.1), ("threshold", 0.0),
                                          ("threshold", 1.5), ("min_count", 0), ("gamma", -1.0)])
def test_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field):
        TiltConfig(**{field: value})


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from pgolf.cli import main

    monkeypatch.setattr(sys, "argv", ["pgolf", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_cli_sweeps_the_tilt_beside_the_cache_and_checks_compliance(tiny_checkpoint_dir, tiny_data_dir, tmp_path,
                                                                     monkeypatch, capsys):
    out = tmp_path / "eval"
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(tiny_checkpoint_dir), "--data", str(tiny_data_dir),
                           "--sliding-stride", "64", "--ngram-order", "3", "--tilt-order", "3,6", "--tilt-boost",
                           "0.5,1.5", "--ngram-buckets", "1024", "--check-compliance", "--out", str(out))
    assert code == 0, err[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    names = [row["name"] for row in manifest["metrics"]["sweep"]]
    assert sorted(names) == ["ngram3_a0.4", "tilt3_b0.5_t0.5_m2", "tilt3_b1.5_t0.5_m2", "tilt6_b0.5_t0.5_m2",
                             "tilt6_b1.5_t0.5_m2"]
    bpbs = [row["val_bpb"] for row in manifest["metrics"]["sweep"]]
    assert bpbs == sorted(bpbs) and all(name in err for name in names)
    assert manifest["checks"] and all(check["ok"] for check in manifest["checks"])
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(tiny_checkpoint_dir), "--data", str(tiny_data_dir),
                           "--tilt-boost", "2", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--tilt-boost given without --tilt-order" in err
