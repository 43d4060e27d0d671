"""Score-first TTT: every chunk scored before it trains anything, the last chunk never trained, the caller's
weights untouched, a real gain on repeated text, LoRA reset semantics and phased SGD pauses.

Model and data: the session's tiny GPT trained on docs-200 (tests/conftest.py) and its real sp1024 val split;
score_chunk scores each target with up to SEQ_LEN tokens of context, as an eval plan does."""

import copy

import pytest
import torch

from pgolf.config import resolve
from pgolf.errors import ComplianceError, UsageError
from pgolf.model import BOS_ID
from pgolf.ttt import TTTConfig, TTTLoRALinear, TTTSession, run_ttt, ttt_document_spans
from tests.test_ngram import SEQ_LEN, chunk_logprobs, load_model, val_documents

PIECE = SEQ_LEN // 2


def score_chunk(model, tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Float64 NLL of targets start..end-1 under the model's current weights, in pieces of PIECE targets, each
    read with the PIECE tokens before it: a target's window depends on the chunk start only, never on where
    the chunk ends (which a later BOS can move)."""
    parts = []
    for piece_start in range(start, end, PIECE):
        piece_end = min(piece_start + PIECE, end)
        context = max(0, piece_start - 1 - PIECE)
        logprobs = chunk_logprobs(model, tokens, piece_start, piece_end, context).double()
        parts.append(-logprobs.gather(1, tokens[piece_start:piece_end, None])[:, 0])
    return torch.cat(parts)


def adapters_of(model) -> list[TTTLoRALinear]:
    return [module for module in model.modules() if isinstance(module, TTTLoRALinear)]


def check_score_first(events: list[tuple[str, int, int]], length: int) -> None:
    """Scores tile targets 1..N-1 once, in order; every update uses scored targets only; the last scored
    chunk trains nothing."""
    scored_upto, last_start = 1, None
    for kind, start, end in events:
        if kind == "score":
            assert start == scored_upto and end > start
            scored_upto, last_start = end, start
        else:
            assert kind == "update" and 1 <= start < end <= scored_upto
    assert scored_upto == length
    assert all(end <= last_start for kind, _, end in events if kind == "update")


@pytest.fixture(scope="module")
def model(tiny_checkpoint_dir):
    return load_model(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def documents(tiny_data_dir):
    """Six real val documents cut to 120 tokens each (BOS first), shortest documents first."""
    return [document[:120] for document in sorted(val_documents(tiny_data_dir), key=len)[:6]]


@pytest.fixture(scope="module")
def stream(documents):
    return torch.cat(documents)


@pytest.mark.parametrize("mode", ["sgd", "adamw", "lora", "phased"])
def test_each_chunk_is_scored_before_training_and_the_caller_keeps_its_weights(model, stream, mode):
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = TTTConfig(mode=mode, chunk_tokens=64, lora_rank=8, prefix_docs=4, phases=2,
                       phase_chunk_tokens=128)
    result = run_ttt(model, stream, config, score_chunk, SEQ_LEN, "cpu")

    check_score_first(result.events, len(stream))
    assert result.nll.shape == (len(stream) - 1,) and result.nll.dtype == torch.float64
    assert torch.isfinite(result.nll).all()
    assert result.steps > 0 and result.train_seconds > 0 and result.score_seconds > 0
    first_end = result.events[0][2]  # nothing has trained before the first chunk: the model's own scores
    assert torch.allclose(result.nll[: first_end - 1], score_chunk(model, stream, 1, first_end), atol=1e-6)
    later = slice(first_end - 1, None)
    assert not torch.allclose(result.nll[later], score_chunk(model, stream, first_end, len(stream)))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not any(p.requires_grad is False for p in model.parameters())  # flags untouched too


@pytest.mark.parametrize("config", [
    TTTConfig(mode="sgd", lr=0.05, epochs=4),
    TTTConfig(mode="adamw", lr=3e-3, epochs=4),
    TTTConfig(mode="lora", lr=3e-3, epochs=4, lora_rank=8, lora_reset="batch", lora_batch_docs=2),
], ids=["sgd", "adamw", "lora"])
def test_training_on_a_scored_document_lowers_the_loss_on_its_repeat(model, documents, config):
    document = torch.cat([documents[0], documents[1][1:]])  # ~240 real tokens, BOS first
    stream = torch.cat([document, document])
    chunked = TTTConfig(**{**config.__dict__, "chunk_tokens": len(document)})  # chunk 1 = the first copy
    adapted = run_ttt(model, stream, chunked, score_chunk, SEQ_LEN, "cpu")
    untrained = TTTConfig(**{**chunked.__dict__, "epochs": 0})
    frozen = run_ttt(model, stream, untrained, score_chunk, SEQ_LEN, "cpu")
    assert [kind for kind, _, _ in adapted.events] == ["score", "update", "score"]
    assert frozen.steps == 0
    repeat = slice(len(document), None)  # targets of the second copy
    assert adapted.nll[repeat].mean() < frozen.nll[repeat].mean() - 0.2


def record_lora_state(log: list):
    """A score_chunk that also notes, per call, its start, whether every B is zero, and the first A."""
    def scorer(model, tokens, start, end):
        adapters = adapters_of(model)
        log.append((start, all(bool((a.lora_b == 0).all()) for a in adapters), adapters[0].lora_a.clone()))
        return score_chunk(model, tokens, start, end)
    return scorer


def test_lora_restarts_b_at_each_document_and_keeps_a(model, stream):
    spans = ttt_document_spans(stream)
    doc_starts = [start for start, _ in spans]
    assert len(spans) == 6 and stream[0] == BOS_ID
    for warm_start in (True, False):
        log = []
        config = TTTConfig(mode="lora", lr=1e-2, chunk_tokens=40, lora_rank=8, lora_warm_start=warm_start)
        run_ttt(model, stream, config, record_lora_state(log), SEQ_LEN, "cpu")
        for i, (start, b_zero, a) in enumerate(log):
            assert b_zero == (start in doc_starts), (warm_start, start)  # B = 0 exactly at document starts
            if start in doc_starts and i > 0:  # A as the last document left it (its last chunk never trains)
                assert torch.equal(a, log[i - 1][2]) == warm_start
        assert not torch.equal(log[0][2], log[-1][2])  # A does train

    log = []
    batched = TTTConfig(mode="lora", lr=1e-2, chunk_tokens=40, lora_rank=8, lora_reset="batch",
                        lora_batch_docs=2)
    run_ttt(model, stream, batched, record_lora_state(log), SEQ_LEN, "cpu")
    assert {start for start, b_zero, _ in log if b_zero} == {doc_starts[0], doc_starts[2], doc_starts[4]}


def test_lora_starts_as_the_base_model(model, stream):
    log = []
    config = TTTConfig(mode="lora", chunk_tokens=40, lora_rank=8)
    result = run_ttt(model, stream, config, record_lora_state(log), SEQ_LEN, "cpu")
    assert len(adapters_of(model)) == 0  # the caller's model was never wrapped
    assert torch.allclose(result.nll[:39], score_chunk(model, stream, 1, 40), atol=1e-6)


def test_phased_sgd_pauses_after_each_phase_of_prefix_documents(model, stream):
    doc_ends = [end for _, end in ttt_document_spans(stream)]
    fingerprints = []

    def scorer(ttt_model, tokens, start, end):
        fingerprints.append((start, ttt_model.blocks[1].mlp.fc.base.weight.sum().item()))
        return score_chunk(ttt_model, tokens, start, end)

    config = TTTConfig(mode="phased", chunk_tokens=64, lora_rank=8, prefix_docs=4, phases=2, phase_lr=0.05,
                       phase_chunk_tokens=100)
    result = run_ttt(model, stream, config, scorer, SEQ_LEN, "cpu")
    check_score_first(result.events, len(stream))
    pauses = {}  # the end of the scored prefix -> the updates that ran before the next score
    for i, (kind, _, end) in enumerate(result.events):
        if kind == "score" and end in doc_ends:
            following = []
            for later in result.events[i + 1 :]:
                if later[0] == "score":
                    break
                following.append(later[1:])
            if following:
                pauses[end] = following
    first, second = doc_ends[1], doc_ends[3]  # after documents 2 and 4 of the 4-document prefix
    assert sorted(pauses) == [first, second]
    assert pauses[first] == [(1, 101), (101, 201), (201, first)]  # every scored target, in 100-target chunks
    assert pauses[second][0] == (1, 101) and pauses[second][-1][1] == second
    base_weight = {start: value for start, value in fingerprints}
    untouched = [value for start, value in fingerprints if start < first]
    assert len(set(untouched)) == 1  # base weights fixed until the first pause
    assert base_weight[first] != untouched[0] and base_weight[second] != base_weight[first]


def test_phase_pauses_never_depend_on_later_documents(model, stream):
    config = TTTConfig(mode="phased", chunk_tokens=64, lora_rank=8, prefix_docs=2000, phases=4, phase_lr=0.05)
    fifth_start, fifth_end = ttt_document_spans(stream)[4]
    cut = fifth_start + 40  # a BOS after `cut` adds a document; nothing scored up to `cut` may move
    split = stream.clone()
    split[cut + 20] = BOS_ID
    original = run_ttt(model, stream, config, score_chunk, SEQ_LEN, "cpu")
    changed = run_ttt(model, split, config, score_chunk, SEQ_LEN, "cpu")
    assert len(ttt_document_spans(split)) == 7 and fifth_end > cut + 20
    assert torch.equal(original.nll[:cut], changed.nll[:cut])
    assert all(end - start <= 64 for _, start, end in original.events)  # 6 < 500 documents: no global SGD


def test_frozen_blocks_stay_fixed(model, stream):
    final = {}

    def scorer(ttt_model, tokens, start, end):
        final.update({name: p.clone() for name, p in ttt_model.named_parameters()})
        return score_chunk(ttt_model, tokens, start, end)

    run_ttt(model, stream, TTTConfig(mode="sgd", lr=0.05, chunk_tokens=128, freeze_blocks=1), scorer,
            SEQ_LEN, "cpu")
    original = dict(model.named_parameters())
    assert all(torch.equal(final[n], original[n]) for n in original if n.startswith("blocks.0."))
    assert not torch.equal(final["blocks.1.mlp.fc.weight"], original["blocks.1.mlp.fc.weight"])
    assert not torch.equal(final["tok_emb.weight"], original["tok_emb.weight"])


def test_guards_refuse_updates_before_scores_and_bad_settings(model, stream):
    session = TTTSession(model, stream, TTTConfig(), score_chunk, SEQ_LEN, "cpu", None)
    params = list(session.model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=0.01)
    with pytest.raises(ComplianceError, match="C3"):
        session.train(1, 65, params, optimizer, 1, 0.01)
    session.score(1, 65)
    session.train(1, 65, params, optimizer, 1, 0.01)
    with pytest.raises(ComplianceError, match="C4"):
        session.score(1, 65)  # scoring a target twice
    with pytest.raises(ComplianceError, match="C4"):
        session.score(100, 120)  # skipping targets 65..99

    with pytest.raises(UsageError, match="lora_targets"):
        run_ttt(model, stream, TTTConfig(mode="lora", lora_targets=("c_x",)), score_chunk, SEQ_LEN, "cpu")
    with pytest.raises(UsageError, match="train_seq_len"):
        run_ttt(model, stream, TTTConfig(), score_chunk, 4 * SEQ_LEN, "cpu")
    with pytest.raises(UsageError, match="freeze_blocks"):
        run_ttt(model, stream, TTTConfig(freeze_blocks=3), score_chunk, SEQ_LEN, "cpu")
    with pytest.raises(ValueError, match="shape"):
        run_ttt(model, stream, TTTConfig(), lambda m, t, s, e: torch.zeros(1), SEQ_LEN, "cpu")


def test_config_defaults_follow_the_mode_and_ranges_are_checked():
    sgd, lora = TTTConfig(), TTTConfig(mode="lora")
    assert (sgd.lr, sgd.momentum, sgd.epochs, sgd.chunk_tokens) == (0.002, 0.9, 3, 32768)
    assert (lora.lr, lora.momentum, lora.epochs, lora.chunk_tokens) == (1e-4, 0.0, 1, 256)
    assert (lora.lora_rank, lora.lora_alpha, lora.lora_weight_decay) == (128, 144.0, 1.0)
    config, sources = resolve(TTTConfig, kind="ttt", env={"PGOLF_LORA_TARGETS": "attn.c_q,mlp.fc"},
                              overrides={"mode": "phased", "lr": 3e-4})
    assert config.lora_targets == ("attn.c_q", "mlp.fc") and config.lr == 3e-4 and config.epochs == 1
    assert sources["lr"] == "command line"
    for field, value in [("mode", "full"), ("lr", 0.0), ("momentum", 1.0), ("chunk_tokens", 0),
                         ("lora_reset", "epoch"), ("phases", 0), ("lora_targets", ())]:
        with pytest.raises(ValueError, match=field):
            TTTConfig(**{field: value})
        with pytest.raises(UsageError, match=field):
            resolve(TTTConfig, kind="ttt", env={}, overrides={field: value if value != () else ""})


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["sgd", "lora", "phased"])
def test_cuda_runs_score_first_like_the_cpu(model, stream, mode):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config = TTTConfig(mode=mode, chunk_tokens=64, lora_rank=8, prefix_docs=4, phases=2,
                       phase_chunk_tokens=128)
    on_cpu = run_ttt(model, stream, config, score_chunk, SEQ_LEN, "cpu")
    on_gpu = run_ttt(copy.deepcopy(model).cuda(), stream.cuda(), config, score_chunk, SEQ_LEN, "cuda")
    assert on_gpu.events == on_cpu.events and on_gpu.steps == on_cpu.steps
    assert abs(on_gpu.nll.mean() - on_cpu.nll.mean()) < 0.05  # bf16 autocast in training, not bit-equal
