"""The records' doc-batched LoRA TTT (mode batched): the adapted forward is the model's own plus adapters, fed
as the records feed them; documents run length-sorted in batches, score-first, B reset per batch, A kept with
warm start; phased SGD comes after its documents are scored and trains rows that stay inside one document."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import pgolf.ttt as batched
from pgolf.config import preset_names, resolve
from pgolf.errors import UsageError
from pgolf.model import BOS_ID, GPT, ModelConfig, rms_norm
from pgolf.ttt import (
    AdaptedModel,
    BatchedAdapters,
    TTTConfig,
    assign_batches,
    batch_cost,
    batched_order,
    batched_seconds_on,
    chunk_window,
    document_rows,
    phase_segments,
    run_ttt,
    ttt_document_spans,
)

TARGETS = ("q", "k", "v", "o", "mlp", "head")
# A record-0416-like tiny model: depth recurrence, parallel lanes, skip gates, token SmearGate, output gate, XSA.
RECORD_LIKE = ModelConfig(vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                          activation="leaky_relu2", num_loops=1, loop_start=1, loop_end=2, parallel_start_layer=4,
                          skip_gates=True, smear_gate_width=8, attn_out_gate_width=8, xsa_last_n=2, rope_dims=4,
                          ln_scale=True, bos_isolation=False, max_seq_len=64)


def record_model(**changes) -> GPT:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(RECORD_LIKE, **changes)).double().eval()
    with torch.no_grad():  # every zero-initialised weight and gate made non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def adapted(model, rows: int, o_input: str = "input", targets=TARGETS):
    adapters = BatchedAdapters(model, targets, 4, 8.0, rows, len(model.layout.execution))
    return AdaptedModel(model, adapters, targets, o_input), adapters


def stream(lengths, vocab=64, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.cat([torch.tensor([BOS_ID]), torch.randint(2, vocab, (n - 1,), generator=generator)])
             for n in lengths]
    return torch.cat(parts)


@pytest.mark.parametrize("tied", [True, False])
def test_with_b_zero_the_adapted_forward_is_the_models_forward_exactly(tied):
    model = record_model(tie_embeddings=tied)
    assert model.layout.execution == (0, 1, 2, 1, 2, 3, 4)
    inputs = torch.randint(0, 64, (3, 20))
    inputs[:, 0] = BOS_ID
    forward, adapters = adapted(model, 3)
    base = model.logits(inputs)
    assert torch.equal(forward.logits(inputs, torch.arange(3)), base)
    # Each adapter, in each block run (slot), reaches the output; only its own document's row changes.
    for key in adapters.b:
        with torch.no_grad():
            adapters.b[key][1].normal_()
        logits = forward.logits(inputs, torch.arange(3))
        assert not torch.equal(logits[1], base[1]), key
        assert torch.equal(logits[[0, 2]], base[[0, 2]]), key
        adapters.reset_b()


def test_a_slice_of_documents_and_selected_positions_are_the_full_forwards_rows():
    model = record_model()
    inputs = torch.randint(0, 64, (3, 20))
    forward, adapters = adapted(model, 4)
    with torch.no_grad():
        for b in adapters.b.values():
            b.normal_()
    full = forward.logits(inputs, torch.tensor([1, 2, 3]))
    assert torch.equal(forward.logits(inputs, slice(1, 4)), full)
    select = torch.tensor([[0, 5, 19], [7, 7, 7], [18, 2, 3]])
    picked = forward.logits(inputs, slice(1, 4), select)
    expected = torch.stack([full[i, select[i]] for i in range(3)])
    torch.testing.assert_close(picked, expected, rtol=1e-12, atol=1e-12)


def test_a_documents_ttt_is_the_same_alone_or_in_a_ragged_batch(monkeypatch):
    """Adapters, AdamW and the per-document loss are all per document, so batching (ragged lengths: rows padded,
    finished documents dropped, logits taken at each row's chunk only) changes nothing when every document's A
    starts the same. Two epochs: the second forward reuses the chunk's rows."""
    model = record_model()
    tokens = stream([37, 9, 21, 30, 16])

    def same_a_for_every_document(self, batch_index):
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for a in self.a.values():
                a.copy_(torch.rand(a.shape[1:], generator=generator, dtype=a.dtype)[None] - 0.5)

    monkeypatch.setattr(BatchedAdapters, "reset_a", same_a_for_every_document)
    runs = {docs: run_ttt(model, tokens, config(lora_batch_docs=docs, lora_warm_start=False, epochs=2, lr=0.01),
                          None, 16, "cpu") for docs in (1, 5)}
    assert runs[5].steps < runs[1].steps
    torch.testing.assert_close(runs[5].nll, runs[1].nll, rtol=1e-9, atol=1e-9)
    untrained = run_ttt(model, tokens, config(lora_batch_docs=5, epochs=0), None, 16, "cpu")
    assert (untrained.nll - runs[5].nll).abs().max() > 1e-3  # the adapters did train
    # The longest document by the algorithm's definition: score chunk ci from its window's full logits, then
    # train `epochs` AdamW steps on that chunk's mean loss (not after the last chunk).
    settings = config(lora_batch_docs=1, lora_warm_start=False, epochs=2, lr=0.01)
    start, end = ttt_document_spans(tokens)[0]
    forward, adapters = adapted(model, 1)
    forward.adapters = adapters = BatchedAdapters(model, TARGETS, settings.lora_rank, settings.lora_alpha, 1,
                                                  len(model.layout.execution))
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=settings.lr, betas=(0.0, batched.TTT_ADAM_BETA2),
                                  eps=batched.TTT_ADAM_EPS, weight_decay=settings.lora_weight_decay)
    length, chunks, expected = end - start, -(-(end - start) // 8), []
    for ci in range(chunks):
        win_start, win_len, offset, count = chunk_window(ci, length, chunks, 8, 16)
        window = tokens[start - 1 + win_start : start + win_start + win_len].long()
        for epoch in range(settings.epochs if ci < chunks - 1 else 1):
            nll = F.cross_entropy(forward.logits(window[None, :-1], slice(0, 1))[0], window[1:], reduction="none")
            if epoch == 0:
                expected.append(nll[offset : offset + count].detach())
            if ci < chunks - 1:
                optimizer.zero_grad()
                nll[offset : offset + count].mean().backward()
                optimizer.step()
    torch.testing.assert_close(runs[5].nll[start - 1 : end - 1], torch.cat(expected), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("o_input", ["input", "attn"])
def test_adapters_read_what_the_records_feed_them(monkeypatch, o_input):
    model = record_model()
    forward, adapters = adapted(model, 2, o_input)
    seen = {}
    original = BatchedAdapters.delta

    def spy(self, key, x, rows):
        seen[key] = x.detach().clone()
        return original(self, key, x, rows)

    monkeypatch.setattr(BatchedAdapters, "delta", spy)
    block_inputs, mlp_inputs, proj_inputs = {}, {}, {}
    block = model.blocks[3]  # run once, at execution slot 5

    def keep(store):
        def hook(module, args):
            store[5] = args[0].clone()
        return hook

    hooks = [block.attn.register_forward_pre_hook(keep(block_inputs)),
             block.mlp.register_forward_pre_hook(keep(mlp_inputs)),
             block.attn.proj.register_forward_pre_hook(keep(proj_inputs))]
    inputs = torch.randint(0, 64, (2, 12))
    forward.logits(inputs, torch.arange(2))
    for hook in hooks:
        hook.remove()
    for kind in ("q", "k", "v"):
        assert torch.equal(seen[f"{kind}5"], block_inputs[5])
    assert torch.equal(seen["o5"], block_inputs[5] if o_input == "input" else proj_inputs[5])
    assert torch.equal(seen["mlp5"], mlp_inputs[5])
    assert torch.equal(seen["head"], model.hidden(inputs))
    assert torch.allclose(seen["head"], rms_norm(seen["head"]))


def test_documents_run_length_sorted_in_batches_longest_first():
    spans = [(1, 11), (11, 14), (14, 40), (40, 45), (45, 49), (49, 60)]  # lengths 10 3 26 5 4 11
    assert batched_order(spans, 2) == [[5, 2], [3, 0], [1, 4]]
    assert batched_order(spans, 64) == [[1, 4, 3, 0, 5, 2]]
    # The records' window: chunk ci's targets with up to `window` targets before, inside the document.
    assert chunk_window(0, 100, 3, 48, 64) == (0, 48, 0, 48)
    assert chunk_window(1, 100, 3, 48, 64) == (32, 64, 16, 48)
    assert chunk_window(2, 100, 3, 48, 64) == (36, 64, 60, 4)


def config(**changes) -> TTTConfig:
    base = dict(mode="batched", chunk_tokens=8, lora_rank=4, lora_alpha=6.0, lora_batch_docs=2, eval_seq_len=16,
                prefix_docs=0)
    return TTTConfig(**{**base, **changes})


def test_each_document_chunk_is_scored_once_before_any_update_that_uses_it():
    model = record_model()
    tokens = stream([9, 40, 30, 17, 25])
    result = run_ttt(model, tokens, config(prefix_docs=3, phases=2), None, 16, "cpu")
    scored = torch.zeros(len(tokens), dtype=torch.int64)
    first_score = []
    for kind, start, end in result.events:
        if kind == "score":
            scored[start:end] += 1
            first_score.append(start)
        else:
            assert bool((scored[start:end] == 1).all()), (start, end)
            spans = ttt_document_spans(tokens)
            assert any(s <= start and end <= e for s, e in spans), "an update crosses a document boundary"
    assert bool((scored[1:] == 1).all()) and scored[0] == 0
    assert first_score[0] == 10  # the longest document (40 tokens) runs first, not the stream's first
    assert result.nll.shape == (len(tokens) - 1,) and bool(torch.isfinite(result.nll).all())
    assert result.steps > 0 and result.score_seconds > 0 and result.train_seconds > 0


def test_without_training_each_document_scores_as_the_model_on_its_own_windows():
    model = record_model()
    tokens = stream([20, 9, 14])
    result = run_ttt(model, tokens, config(epochs=0, eval_seq_len=64), None, 16, "cpu")
    for start, end in ttt_document_spans(tokens):
        inputs = tokens[start - 1 : end - 1][None].long()
        expected = F.cross_entropy(model.logits(inputs)[0], tokens[start:end].long(), reduction="none")
        assert torch.allclose(result.nll[start - 1 : end - 1], expected.double(), atol=1e-10, rtol=0)


def test_b_restarts_every_batch_and_a_is_kept_only_with_warm_start(monkeypatch):
    model = record_model()
    tokens = stream([30, 28, 26, 24])
    original = batched.ttt_batch
    for warm in (True, False):
        log = []

        def spy(session, forward, params, optimizer, spans, window, score, update, log=log):
            adapters = forward.adapters
            log.append(("in", {k: a.detach().clone() for k, a in adapters.a.items()},
                        [float(b.detach().abs().sum()) for b in adapters.b.values()]))
            original(session, forward, params, optimizer, spans, window, score, update)
            log.append(("out", {k: a.detach().clone() for k, a in adapters.a.items()}, None))

        monkeypatch.setattr(batched, "ttt_batch", spy)
        run_ttt(model, tokens, config(lora_warm_start=warm), None, 16, "cpu")
        (_, a0, b0), (_, a0_out, _), (_, a1, b1), _ = log
        assert sum(b0) == 0 and sum(b1) == 0
        assert not torch.equal(a0["q0"], a0_out["q0"])  # A trains inside a batch
        assert all(torch.equal(a1[k], a0_out[k]) for k in a1) == warm


def test_phases_come_after_their_documents_are_scored_and_rows_stay_inside_documents(monkeypatch):
    assert document_rows([(1, 11), (12, 15)], 4) == [(1, 1, 5), (5, 5, 9), (7, 9, 11), (12, 12, 15)]
    model = record_model()
    tokens = stream([30, 28, 26, 24, 22, 20])
    pauses = []
    original = batched.ttt_phase_sgd

    def spy(session, base_params, spans, update):
        scored = torch.zeros(len(tokens), dtype=torch.bool)
        for kind, start, end in session.result.events:
            if kind == "score":
                scored[start:end] = True
        assert all(bool(scored[s:e].all()) for s, e in spans)
        pauses.append(len(spans))
        original(session, base_params, spans, update)

    monkeypatch.setattr(batched, "ttt_phase_sgd", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_ttt(model, tokens, config(prefix_docs=4, phases=2, batch_seqs=2), None, 8, "cpu")
    assert pauses == [2, 4]  # after the batches holding the first 2 and 4 scored documents
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is kept


def test_phase_pauses_cut_the_batches_into_segments():
    batches = [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert phase_segments(batches, []) == [[0, 1, 2, 3, 4]]
    assert phase_segments(batches, [2, 5]) == [[0], [1, 2], [3, 4]]  # after 2 and 5 documents
    assert phase_segments(batches, [3, 4]) == [[0, 1], [2, 3, 4]]  # one batch can pass two thresholds
    assert phase_segments(batches, [8]) == [[0, 1, 2, 3, 4]]  # never a pause after the last batch


def test_batches_go_to_ranks_costliest_first_to_the_least_loaded():
    assert assign_batches([10, 6, 5, 4, 3], 2) == [[0, 3], [1, 2, 4]]  # loads 14 and 14
    assert assign_batches([10, 6, 5, 4, 3], 1) == [[0, 1, 2, 3, 4]]
    assert assign_batches([1, 1], 3) == [[0], [1], []]
    # A batch's cost: per chunk step a fixed cost plus each active document's context.
    assert batch_cost([(1, 9)], 4, 16) == 2 * batched.TTT_STEP_COST_TOKENS + 4 + 8
    assert batch_cost([(1, 9), (9, 12)], 4, 6) == 2 * batched.TTT_STEP_COST_TOKENS + 2 * 4 + 6


def test_the_time_on_more_gpus_is_each_segments_busiest_gpu_plus_the_phases():
    result = batched.TTTResult(nll=torch.zeros(0), segments=[[0, 1, 2], [3, 4]], batch_costs=[9, 5, 4, 3, 3],
                               batch_seconds=[8.0, 5.0, 4.0, 2.0, 1.0], phase_seconds=6.0)
    assert batched_seconds_on(result, 1, 1) == 20.0 + 6.0
    # 2 GPUs: segment 1 -> {0} and {1, 2}: max(8, 9); segment 2 -> {3}, {4}: 2; phases halve.
    assert batched_seconds_on(result, 2, 1) == 9.0 + 2.0 + 3.0
    assert batched_seconds_on(result, 8, 2) == 8.0 + 2.0 + 1.5


def test_named_settings_reproduce_the_records():
    assert {"record-0416", "record-1790"} <= set(preset_names("ttt"))
    r0416, _ = resolve(TTTConfig, kind="ttt", preset="record-0416", env={})
    assert (r0416.mode, r0416.lora_rank, r0416.lora_alpha, r0416.lora_weight_decay, r0416.lr) == \
        ("batched", 96, 96.0, 0.5, 1e-4)
    assert (r0416.lora_warm_start, r0416.prefix_docs, r0416.chunk_tokens, r0416.eval_seq_len) == (False, 0, 48, 2048)
    r1790, _ = resolve(TTTConfig, kind="ttt", preset="record-1790", env={})
    assert (r1790.lora_rank, r1790.lora_alpha, r1790.lora_weight_decay, r1790.lora_warm_start) == \
        (128, 144.0, 1.0, True)
    assert (r1790.phases, r1790.prefix_docs, r1790.phase_lr, r1790.lora_batch_docs, r1790.momentum) == \
        (3, 2000, 0.001, 64, 0.0)
    assert TTTConfig(mode="batched").chunk_tokens == 48
    with pytest.raises(ValueError, match="batched_targets"):
        TTTConfig(mode="batched", batched_targets=("q", "fc"))
    with pytest.raises(ValueError, match="lora_o_input"):
        TTTConfig(mode="batched", lora_o_input="output")


def test_the_cli_expands_a_named_setting_under_the_flags():
    from stages.evaluate import resolve_ttt

    settings = resolve_ttt(True, None, {"mode": "record-1790", "lr": 2e-4, "epochs": None})
    assert settings.mode == "batched" and settings.lora_rank == 128 and settings.lr == 2e-4


def test_batched_ttt_refuses_the_ngram_cache():
    with pytest.raises(UsageError, match="stream's order"):
        batched.check_batched_usage(True)


def test_the_compiled_adapted_forward_scores_and_trains_as_the_eager_one():
    """TTTConfig.compile traces the adapted forward (hooks included) with dynamic shapes: windows growing and
    sliding, a short last chunk, two batches with a phase pause between them give the eager run's scores and
    updates. aot_eager is the backend here (Inductor's CPU code generation would take minutes; the traced graph
    is the same), on a shallower record-like model (one looped block, a parallel lane), and every step keeps two
    documents active: each graph traced costs seconds on a CPU."""
    model = record_model(num_layers=3, loop_end=1, parallel_start_layer=2, xsa_last_n=1)
    tokens = stream([37, 22, 37, 22])
    settings = dict(lora_batch_docs=2, epochs=2, lr=0.01, prefix_docs=2, phases=1)
    eager = run_ttt(model, tokens, config(**settings), None, 16, "cpu")
    compiled = run_ttt(model, tokens, config(**settings, compile="aot_eager"), None, 16, "cpu")
    torch.testing.assert_close(compiled.nll, eager.nll, rtol=1e-9, atol=1e-9)
    assert compiled.events == eager.events
    untrained = run_ttt(model, tokens, config(lora_batch_docs=2, epochs=0), None, 16, "cpu")
    assert (untrained.nll - compiled.nll).abs().max() > 1e-3  # the adapters did train
    with pytest.raises(ValueError, match="compile"):
        TTTConfig(mode="batched", compile="fast")
    with pytest.raises(ValueError,
                       match="attention_kernel = 'fa3': must be one of auto, torch, flash, cudnn, efficient"):
        TTTConfig(mode="batched", attention_kernel="fa3")
