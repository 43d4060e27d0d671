"""The legal n-gram cache: full normalized rows (C2), causality (C1), counts only from scored tokens (C3),
and a real gain on repeated real text; the seeds' illegal target-keyed lookup is shown to break C2.

Model and data: the session's tiny GPT trained on docs-200 (tests/conftest.py) and its real sp1024 val
split."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.checkpoint import load_checkpoint
from pgolf.config import resolve
from pgolf.errors import ComplianceError, UsageError
from pgolf.model import BOS_ID, GPT
from pgolf.ngram import (
    NGRAM_HASH_MULTIPLIER,
    NGRAM_HASH_PRIME,
    NgramConfig,
    NgramMixer,
)
from pgolf.shards import list_shards, load_split

SEQ_LEN = 128
CHUNK = 64  # targets scored per mix call, then counted by update



def load_model(checkpoint_dir, dtype=torch.float32) -> GPT:
    state_dict, config, _ = load_checkpoint(checkpoint_dir / "model.safetensors")
    model = GPT(config)
    model.load_state_dict(state_dict)
    return model.to(dtype).eval()


def val_documents(data_dir) -> list[torch.Tensor]:
    """The real val split cut at BOS: one tensor per document, each starting with its BOS."""
    tokens = torch.from_numpy(load_split(list_shards(data_dir, "val")).astype(np.int64))
    starts = (tokens == BOS_ID).nonzero().flatten().tolist() + [len(tokens)]
    return [tokens[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


@torch.no_grad()
def chunk_logprobs(model: GPT, tokens: torch.Tensor, start: int, end: int, context: int | None = None):
    """The model's log-distributions [end - start, V] for targets start..end-1, read from one window of the
    tokens [context, end - 1) (default: the SEQ_LEN before end); GPT.logits' ops without its float32 cast,
    so a float64 model stays float64."""
    context = max(0, end - 1 - SEQ_LEN) if context is None else context
    hidden = model.hidden(tokens[context : end - 1][None])[0]
    raw = F.linear(hidden, model.tok_emb.weight)
    softcap = model.config.logit_softcap
    logprobs = torch.log_softmax(softcap * torch.tanh(raw / softcap), dim=-1)
    return logprobs[start - context - 1 :]


def model_chunks(model: GPT, tokens: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, model log-distributions) of the chunks of targets 1..N-1, in order."""
    chunks = []
    for start in range(1, len(tokens), CHUNK):
        end = min(start + CHUNK, len(tokens))
        chunks.append((start, end, chunk_logprobs(model, tokens, start, end)))
    return chunks


def score_chunks(chunks, tokens: torch.Tensor, mixer: NgramMixer | None) -> torch.Tensor:
    """NLL [N - 1] of targets 1..N-1, chunk by chunk: mix with the counts of earlier chunks, then count this
    one."""
    nll = []
    for start, end, logprobs in chunks:
        if mixer is not None:
            logprobs = mixer.mix(tokens, torch.arange(start, end), logprobs)
            mixer.update(tokens, end)
        nll.append(-logprobs.gather(1, tokens[start:end, None])[:, 0])
    return torch.cat(nll)


def c2_bad_rows(logprobs: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """Rows whose probabilities do not sum to 1 within tolerance (the C2 check, in float64)."""
    sums = logprobs.double().exp().sum(-1)
    return ((sums - 1).abs() > tolerance).nonzero().flatten()


@pytest.fixture(scope="module")
def model(tiny_checkpoint_dir):
    return load_model(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def documents(tiny_data_dir):
    """The real val documents, shortest first (each over 1,000 tokens)."""
    return sorted(val_documents(tiny_data_dir), key=len)


@pytest.fixture(scope="module")
def stream(documents):
    """About 2,300 real tokens: the two shortest val documents, BOS first."""
    return torch.cat(documents[:2])


@pytest.mark.parametrize("alpha_mode, alpha", [("fixed", 0.4), ("entropy", 0.6), ("fixed", 1.0)])
def test_every_mixed_row_is_a_full_distribution(model, stream, alpha_mode, alpha):
    mixer = NgramMixer(NgramConfig(order=5, alpha=alpha, alpha_mode=alpha_mode, buckets=4096), 1024, "cpu")
    mixer.update(stream, 1500)  # counts from the scored prefix, then every later target's full row
    positions = torch.arange(1500, 1500 + SEQ_LEN)
    model_logprobs = chunk_logprobs(model, stream, 1500, 1500 + SEQ_LEN)
    assert model_logprobs.dtype == torch.float32
    mixed = mixer.mix(stream, positions, model_logprobs)
    assert mixed.shape == (SEQ_LEN, 1024) and mixed.dtype == torch.float32
    assert len(c2_bad_rows(mixed)) == 0
    p_ngram = mixer.distribution(stream, positions, torch.float64)
    assert torch.allclose(p_ngram.sum(-1), torch.ones(SEQ_LEN, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (p_ngram > 0).all()  # the uniform floor: no token is ever impossible
    assert not torch.equal(mixed, model_logprobs)  # the cache did change the distribution


def test_scores_never_depend_on_later_tokens(tiny_checkpoint_dir, stream):
    model64 = load_model(tiny_checkpoint_dir, torch.float64)
    stream = stream[:1000]
    cut = 600  # targets 1..cut must not move when every token after position cut changes
    perturbed = stream.clone()
    generator = torch.Generator().manual_seed(1)
    perturbed[cut + 1 :] = torch.randint(3, 1024, (len(stream) - cut - 1,), generator=generator)
    config = NgramConfig(order=4, alpha=0.6, alpha_mode="entropy", buckets=2048)
    original = score_chunks(model_chunks(model64, stream), stream, NgramMixer(config, 1024, "cpu"))
    changed = score_chunks(model_chunks(model64, perturbed), perturbed, NgramMixer(config, 1024, "cpu"))
    assert original.dtype == torch.float64
    assert torch.allclose(original[:cut], changed[:cut], atol=1e-12, rtol=0)
    assert not torch.allclose(original[cut:], changed[cut:])  # the perturbation is real


def test_counts_come_only_from_scored_tokens(model, documents):
    passage, other, filler = documents[0][1:300], documents[1][1:300], documents[2][1:300]
    bos = torch.tensor([BOS_ID])
    repeated_later = torch.cat([bos, passage, other, passage])  # the passage recurs only in the future
    not_repeated = torch.cat([bos, passage, other, filler])
    config = NgramConfig(order=6, alpha=0.4, buckets=4096)
    first = slice(0, len(passage))  # targets 1..300: the first occurrence
    chunks = model_chunks(model, repeated_later)
    with_future = score_chunks(chunks, repeated_later, NgramMixer(config, 1024, "cpu"))
    without_future = score_chunks(model_chunks(model, not_repeated), not_repeated,
                                  NgramMixer(config, 1024, "cpu"))
    assert torch.equal(with_future[first], without_future[first])  # no gain from the future copy
    second = slice(len(passage) + len(other), None)
    model_only = score_chunks(chunks, repeated_later, None)
    assert with_future[second].mean() < 0.6 * model_only[second].mean()  # the past copy does help

    leaky = NgramMixer(config, 1024, "cpu")
    leaky.update(repeated_later, len(repeated_later))  # counts the whole stream before scoring it
    with pytest.raises(ComplianceError, match="already counted"):
        leaky.mix(repeated_later, torch.arange(1, 65), chunk_logprobs(model, repeated_later, 1, 65))


def test_cache_lowers_nll_on_a_repeated_real_document(model, documents):
    document = documents[0][:700]
    stream = torch.cat([document, document])
    chunks = model_chunks(model, stream)
    model_only = score_chunks(chunks, stream, None)
    for mode, alpha in (("fixed", 0.4), ("entropy", 0.6)):
        mixed = score_chunks(chunks, stream, NgramMixer(NgramConfig(7, alpha, mode, 8192), 1024, "cpu"))
        second = slice(len(document), None)
        assert mixed[second].mean() < 0.5 * model_only[second].mean(), mode
        assert mixed.mean() < model_only.mean(), mode


def hashed_rows(tokens: list[int], position: int, order: int, buckets: int) -> list[int]:
    """The reference hash of ngram.py, one position at a time: rows of the 1..order-1 previous tokens."""
    rows, hashed = [], 0
    for j in range(1, order):
        if position - j < 0:
            break
        hashed = (hashed * NGRAM_HASH_MULTIPLIER + tokens[position - j] + 1) % NGRAM_HASH_PRIME
        rows.append(hashed % buckets)
    return rows


def test_distribution_matches_a_direct_witten_bell_reference(stream):
    order, buckets, vocab = 4, 97, 1024  # few buckets: collisions merge rows, which must stay normalized
    tokens = stream[:400].tolist()
    counts = [dict() for _ in range(order)]  # counts[0]: unigram; counts[k]: (row, follower) -> count
    for q, follower in enumerate(tokens[:300]):
        counts[0][follower] = counts[0].get(follower, 0) + 1
        for k, row in enumerate(hashed_rows(tokens, q, order, buckets), start=1):
            counts[k][(row, follower)] = counts[k].get((row, follower), 0) + 1
    mixer = NgramMixer(NgramConfig(order=order, alpha=0.5, buckets=buckets), vocab, "cpu")
    for upto in (50, 51, 180, 300):  # counting in pieces equals counting at once
        mixer.update(stream[:400], upto)
    positions = [300, 301, 350, 399]
    got = mixer.distribution(stream[:400], torch.tensor(positions), torch.float64)
    for i, position in enumerate(positions):
        p = np.full(vocab, 1.0 / vocab)
        levels = [{(None, v): c for v, c in counts[0].items()}]
        keys = [None] + hashed_rows(tokens, position, order, buckets)
        levels += [{key: c for key, c in counts[k].items() if key[0] == keys[k]} for k in range(1, len(keys))]
        for level in levels:
            row = np.zeros(vocab)
            for (_, v), c in level.items():
                row[v] = c
            if row.sum() > 0:
                types = (row > 0).sum()
                p = (row + types * p) / (row.sum() + types)
        assert np.allclose(got[i].numpy(), p, atol=1e-15, rtol=1e-12)


def target_keyed_scores(tokens: torch.Tensor, position: int, order: int, buckets: int) -> torch.Tensor:
    """The seeds' illegal cache for one target, evaluated for every candidate v: a context-count table and a
    table keyed by hash(context, v), filled from the tokens before `position`;
    score(v) = min(full, ctx) / ctx."""
    primes = [36313, 27191, 51647, 81929, 131071, 175447, 209591]
    mask = buckets - 1

    def context_hash(q: int) -> int:
        hashed = 0
        for k in range(order - 1):
            hashed ^= int(tokens[q - (order - 1 - k)]) * primes[k % len(primes)]
        return hashed

    context_table, full_table = np.zeros(buckets), np.zeros(buckets)
    for q in range(order - 1, position):
        hashed = context_hash(q)
        context_table[hashed & mask] += 1
        full_table[(hashed ^ int(tokens[q]) * primes[(order - 1) % len(primes)]) & mask] += 1
    hashed = context_hash(position)
    context_count = context_table[hashed & mask]
    candidates = np.arange(1024)
    full_counts = full_table[(hashed ^ candidates * primes[(order - 1) % len(primes)]) & mask]
    return torch.from_numpy(np.minimum(full_counts, context_count) / max(context_count, 1.0))


def test_target_keyed_lookup_sums_far_above_one_and_fails_c2(model, stream):
    alpha, positions = 0.4, range(1200, 1216)
    model_probs = chunk_logprobs(model, stream, 1200, 1216).double().exp()
    illegal = torch.stack([target_keyed_scores(stream, p, order=3, buckets=1024) for p in positions])
    illegal_mixture = (1 - alpha) * model_probs + alpha * illegal
    assert illegal_mixture.sum(-1).median() > 10  # a great gold-token score, from no distribution
    assert len(c2_bad_rows(illegal_mixture.log())) == len(positions)

    mixer = NgramMixer(NgramConfig(order=3, alpha=alpha, buckets=1024), 1024, "cpu")
    mixer.update(stream, 1200)
    legal = mixer.mix(stream, torch.tensor(list(positions)), model_probs.log())
    assert len(c2_bad_rows(legal)) == 0


@pytest.mark.parametrize("field, value", [("order", 1), ("order", 17), ("alpha", 1.5), ("alpha", -0.1),
                                          ("alpha_mode", "adaptive"), ("buckets", 0)])
def test_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field):
        NgramConfig(**{field: value})
    with pytest.raises(UsageError, match=field):
        resolve(NgramConfig, kind="ngram", env={}, overrides={field: value})


def test_entropy_alpha_is_the_seed_formula_with_alpha_as_ceiling():
    with pytest.raises(ValueError, match="alpha"):
        NgramConfig(alpha=0.01, alpha_mode="entropy")
    mixer = NgramMixer(NgramConfig(order=2, alpha=0.6, alpha_mode="entropy", buckets=1), 4, "cpu")
    logprobs = torch.log(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64))
    entropy = torch.tensor([0.0, np.log(4)], dtype=torch.float64)
    expected = 0.05 + 0.55 * torch.sigmoid(2 * (entropy - 4))
    assert torch.allclose(mixer.alpha(logprobs)[:, 0], expected, atol=1e-15)
    assert NgramConfig(order=7, buckets=65536).table_bytes(1024) == 6 * 65536 * 1024 * 4


@pytest.mark.cuda
def test_cuda_matches_cpu(model, stream):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config = NgramConfig(order=7, alpha=0.6, alpha_mode="entropy", buckets=4096)
    positions = torch.arange(1500, 1500 + SEQ_LEN)
    model_logprobs = chunk_logprobs(model, stream, 1500, 1500 + SEQ_LEN)
    results = []
    for device in ("cpu", "cuda"):
        mixer = NgramMixer(config, 1024, device)
        mixer.update(stream.to(device), 1500)
        results.append(mixer.mix(stream.to(device), positions.to(device), model_logprobs.to(device)).cpu())
        assert len(c2_bad_rows(results[-1])) == 0
    assert torch.allclose(results[0], results[1], atol=1e-5, rtol=0)
