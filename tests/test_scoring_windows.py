"""Window planning: every target scored exactly once (tail included), the context each gets, documents kept
apart, and no window whose shape depends on tokens after the targets it scores."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgolf.evaluate import EvalConfig
from pgolf.scoring import plan_windows, split_for_rank
from pgolf.shards import BOS_ID


def scored_positions(windows: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(first, end + 1) for _, first, end in windows]) if len(windows) else \
        np.zeros(0, dtype=np.int64)


def stream(length: int, bos_every: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 1024, length)
    tokens[rng.random(length) < 1 / bos_every] = BOS_ID
    tokens[0] = BOS_ID
    return tokens


def check_plan(tokens, windows, seq_len, stride, doc_isolated):
    positions = scored_positions(windows)
    # Every target 1..N-1 exactly once, in increasing order (C4; nothing dropped at the tail).
    np.testing.assert_array_equal(positions, np.arange(1, len(tokens)))
    starts, firsts, ends = windows.T
    assert np.all(ends - starts <= seq_len) and np.all(starts < firsts) and np.all(firsts <= ends)
    if doc_isolated:
        for start, _, end in windows:
            # The window reads tokens[start:end]: a BOS may open it, never sit inside it.
            assert not np.any(tokens[start + 1 : end] == BOS_ID), (start, end)
    else:
        # Each target sees >= seq_len - stride + 1 tokens, or everything before it.
        context_of_first = firsts - starts
        assert np.all((context_of_first >= seq_len - stride + 1) | (starts == 0))


@settings(max_examples=150, deadline=None)
@given(length=st.integers(2, 600), seq_len=st.integers(1, 64), stride_frac=st.floats(0.01, 1.0),
       doc_isolated=st.booleans(), bos_every=st.integers(2, 200), seed=st.integers(0, 10_000))
def test_every_target_once_with_its_promised_context(length, seq_len, stride_frac, doc_isolated, bos_every,
                                                     seed):
    stride = max(1, int(round(stride_frac * seq_len)))
    tokens = stream(length, bos_every, seed)
    check_plan(tokens, plan_windows(tokens, seq_len, stride, doc_isolated), seq_len, stride, doc_isolated)


def test_flat_is_the_challenges_chunks_plus_one_short_tail_window():
    tokens = stream(1 + 3 * 128 + 50, 10_000)
    windows = plan_windows(tokens, 128, 128, False)
    # The challenge's eval_val reads x = tokens[kL:(k+1)L], y = tokens[kL+1:(k+1)L+1] and drops the 50-target
    # tail; we score the tail too, in one short window.
    np.testing.assert_array_equal(windows[:3], [[0, 1, 128], [128, 129, 256], [256, 257, 384]])
    np.testing.assert_array_equal(windows[3], [384, 385, 434])
    assert len(windows) == 4


def test_sliding_scores_the_first_window_whole_then_stride_targets_per_window():
    tokens = stream(1 + 1024 + 64 * 5 + 10, 10_000)
    windows = plan_windows(tokens, 1024, 64, False)
    np.testing.assert_array_equal(windows[0], [0, 1, 1024])
    np.testing.assert_array_equal(windows[1], [64, 1025, 1088])  # each target sees >= 961 tokens
    np.testing.assert_array_equal(windows[-1], [384, 1345, 1354])  # tail: 10 targets, full context, once
    assert (windows[1:-1, 2] - windows[1:-1, 1] + 1 == 64).all()


def test_mode_follows_the_stride_and_doc_flag():
    assert EvalConfig().mode(128) == "flat" and EvalConfig().stride(128) == 128
    assert EvalConfig(sliding_stride=128).mode(128) == "flat"
    assert EvalConfig(sliding_stride=64).mode(128) == "sliding"
    assert EvalConfig(sliding_stride=64, doc_isolated=True).mode(128) == "doc"


def test_window_starts_never_depend_on_where_the_stream_or_document_ends():
    # Cutting the stream (or starting a new document) after target t must leave the windows of targets <= t
    # reading the same context: a right-aligned last window would let the future choose the past's context.
    tokens = stream(3000, 400, seed=3)
    for doc_isolated in (False, True):
        full = plan_windows(tokens, 256, 48, doc_isolated)
        for cut in (700, 1501, 2222):
            shorter = plan_windows(tokens[: cut + 1], 256, 48, doc_isolated)
            changed = tokens.copy()
            changed[cut + 1] = BOS_ID
            with_bos = plan_windows(changed, 256, 48, doc_isolated)
            for plan in (shorter, with_bos):
                for start, first, end in plan:
                    match = full[(full[:, 1] <= first) & (full[:, 2] >= first)][0]
                    if first <= cut:
                        assert start == match[0], (doc_isolated, cut, start, first, end)


def test_a_target_range_plans_exactly_its_targets():
    tokens = stream(4000, 500)
    for doc_isolated in (False, True):
        chunks = [plan_windows(tokens, 128, 32, doc_isolated, first, last)
                  for first, last in ((1, 999), (1000, 1000), (1001, 3999))]
        np.testing.assert_array_equal(scored_positions(np.concatenate(chunks)), np.arange(1, 4000))


def test_rank_shares_are_whole_batches_covering_every_window():
    windows = plan_windows(stream(10_000, 700), 128, 64, False)
    shares = [split_for_rank(windows, rank, 3, batch_seqs=16) for rank in range(3)]
    np.testing.assert_array_equal(np.concatenate(shares), windows)
    assert all(len(share) for share in shares) and all(len(share) % 16 == 0 for share in shares[:-1])


@pytest.mark.parametrize("field, value, named", [
    ("sliding_stride", -1, "sliding_stride"), ("batch_seqs", 0, "batch_seqs"), ("seq_len", -5, "seq_len"),
    ("ngram_order", (1,), "order"), ("alpha", (1.5,), "alpha"), ("alpha_mode", "tuned", "alpha_mode")])
def test_config_names_the_bad_field(field, value, named):
    with pytest.raises(ValueError, match=named):
        EvalConfig(**{"seq_len": 128, "ngram_order": (3,), field: value})


def test_stride_over_seq_len_is_refused():
    with pytest.raises(ValueError, match="sliding_stride"):
        EvalConfig(seq_len=64, sliding_stride=65)
    with pytest.raises(ValueError, match="stride"):
        plan_windows(stream(100, 10), 16, 17, False)
