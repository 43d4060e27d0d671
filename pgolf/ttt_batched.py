"""The records' TTT (04-10 / 04-16 / 04-27 lineage, seed #1790): doc-batched LoRA, with optional phased SGD.

Documents are the stream's BOS-delimited spans (ttt_document_spans: a document's targets run through the next
BOS). As the records order them, documents are sorted by length (stable, ties in stream order), cut into
batches of `lora_batch_docs`, and the batches run longest first. Inside a batch every document has its own
adapters (row b of each adapter tensor); the batch walks chunk index ci = 0, 1, ...: each document that still
has a chunk ci scores it in one forward over its context window (the chunk's end and up to eval_seq_len
tokens before it, never before the document's BOS; the records' _compute_chunk_window), and then each document
with a later chunk trains its adapters on the per-document mean NLL of that chunk (one AdamW step per epoch,
no gradient clipping: each document's step depends on its own tokens only). At each batch B restarts at 0 and
the optimizer restarts; A restarts too unless lora_warm_start (then row b's A carries over, trained by the
documents scored in row b before).

Adapters (batched_targets), y += (lora_alpha / lora_rank) * x A^T B^T, one set per block run (depth recurrence
runs a block several times, each run its own slot):
  q, k, v: on attn.c_q / c_k / c_v, reading the block's normed input (the projection's own input);
  o:       added to attn.proj's output, reading the block's normed input (lora_o_input "input", 04-16's code)
           or the attention output, proj's own input ("attn");
  mlp:     added to the MLP's output, reading the MLP's normed input;
  head:    added to the raw logits before the softcap, reading the final normed hidden state (tied or not).
The adapters live in forward hooks on the model's own modules, so the adapted forward is GPT.hidden and
GPT.logits_from_hidden exactly, plus the adapters (with B = 0 it equals model.logits bit for bit).

Phases (prefix_docs > 0): after the batch in which the count of scored documents reaches prefix_docs * i /
phases (i = 1..phases; none after the last batch), SGD trains every base weight on every document scored so
far, in rows that stay inside one document (a row's inputs start at or after its document's BOS), lr cosine-
decayed over groups of phase_chunk_tokens targets; then scoring resumes with B = 0.

Legality: a score uses only its document's earlier tokens plus weights trained on already-scored targets (C3);
the order depends on document lengths (BOS positions) only. pgolf.compliance checks such out-of-order runs
with BOS positions held fixed.
"""

import math
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.errors import ComplianceError, UsageError
from pgolf.model import block_layout
from pgolf.ttt import (TTT_ADAM_BETA2, TTT_ADAM_EPS, TTT_LORA_SEED, TTTSession, ttt_cosine_lr,
                       ttt_document_spans, ttt_row_batches)


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
        self.generator = torch.Generator().manual_seed(TTT_LORA_SEED)
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        keys = [(f"{kind}{slot}", shapes[kind]) for kind in targets if kind != "head" for slot in range(slots)]
        if "head" in targets:
            keys.append(("head", (dim, config.vocab_size)))
        for key, (fan_in, fan_out) in keys:
            self.a[key] = nn.Parameter(torch.empty(docs, rank, fan_in, device=weight.device, dtype=weight.dtype))
            self.b[key] = nn.Parameter(torch.zeros(docs, fan_out, rank, device=weight.device, dtype=weight.dtype))
        self.reset_a()

    @torch.no_grad()
    def reset_a(self) -> None:
        for a in self.a.values():
            bound = 1.0 / math.sqrt(a.size(-1))
            a.copy_(torch.empty(a.shape, dtype=torch.float64).uniform_(-bound, bound, generator=self.generator))

    @torch.no_grad()
    def reset_b(self) -> None:
        for b in self.b.values():
            b.zero_()

    def delta(self, key: str, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """scale * x A^T B^T for x [n, T, in], row i using document rows[i]'s adapter."""
        a, b = self.a[key][rows].to(x.dtype), self.b[key][rows].to(x.dtype)
        return self.scale * torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class AdaptedModel:
    """Forward hooks that add the adapters to the model's own modules while `logits` runs."""

    def __init__(self, model, adapters: BatchedAdapters, targets, o_input: str):
        self.model, self.adapters, self.targets, self.o_input = model, adapters, set(targets), o_input
        layout = model.layout if model.looping else block_layout(model.config, looping=False)
        self.slots = {b: [i for i, e in enumerate(layout.execution) if e == b] for b in set(layout.execution)}
        self.rows: torch.Tensor | None = None
        self.runs: dict[int, int] = {}
        self.slot, self.block_input = 0, None
        self.handles = []
        for index, block in enumerate(model.blocks):
            attn = block.attn
            self.handles += [attn.register_forward_pre_hook(partial(self.enter, index)),
                             attn.c_q.register_forward_hook(partial(self.add, "q")),
                             attn.c_k.register_forward_hook(partial(self.add, "k")),
                             attn.c_v.register_forward_hook(partial(self.add, "v")),
                             attn.proj.register_forward_hook(partial(self.add, "o")),
                             block.mlp.register_forward_hook(partial(self.add, "mlp"))]

    def enter(self, index: int, module, args) -> None:
        if self.rows is None:
            return
        run = self.runs.get(index, 0)
        self.runs[index] = run + 1
        self.slot, self.block_input = self.slots[index][run], args[0]

    def add(self, kind: str, module, args, output):
        if self.rows is None or kind not in self.targets:
            return None
        source = self.block_input if kind == "o" and self.o_input == "input" else args[0]
        return output + self.adapters.delta(f"{kind}{self.slot}", source, self.rows)

    def logits(self, inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Softcapped logits [n, T, V] of inputs [n, T], row i adapted by document rows[i]'s adapters."""
        self.rows, self.runs = rows, {}
        try:
            hidden = self.model.hidden(inputs)
            head = partial(self.adapters.delta, "head", rows=rows) if "head" in self.targets else None
            return self.model.logits_from_hidden(hidden, head)
        finally:
            self.rows, self.block_input = None, None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def ttt_batched(session: TTTSession, score_logits: Callable | None, on_update: Callable | None) -> None:
    config, model, tokens, device = session.config, session.model, session.tokens, session.device
    window = min(config.eval_seq_len, model.config.max_seq_len)
    session.tokens_cpu = tokens.cpu()
    spans = ttt_document_spans(session.tokens_cpu)
    batches = batched_order(spans, config.lora_batch_docs)
    slots = len((model.layout if model.looping else block_layout(model.config, looping=False)).execution)
    docs = min(config.lora_batch_docs, len(spans))
    adapters = BatchedAdapters(model, config.batched_targets, config.lora_rank, config.lora_alpha, docs, slots)
    adapted = AdaptedModel(model, adapters, config.batched_targets, config.lora_o_input)
    lora_params = list(adapters.parameters())
    scored = torch.zeros(len(tokens), dtype=torch.bool)
    session.position_nll = torch.full((len(tokens),), math.nan, dtype=torch.float64)
    thresholds = sorted({config.prefix_docs * (i + 1) // config.phases for i in range(config.phases)} - {0}) \
        if config.prefix_docs else []
    done: list[int] = []
    base_params = list(model.parameters())

    def score(positions: torch.Tensor, logits: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
        began = time.perf_counter()
        with torch.no_grad():
            if score_logits is not None:
                nll = score_logits(positions.to(device), logits)
            else:
                nll = F.cross_entropy(logits.double(), tokens[positions.to(tokens.device)].long().to(device),
                                      reduction="none")
        session.result.score_seconds += time.perf_counter() - began
        cpu = positions.cpu()
        if bool(scored[cpu].any()) or bool((cpu < 1).any()):
            raise ComplianceError("batched TTT scored a target twice (C4)")
        scored[cpu] = True
        session.result.events.extend(("score", start, end) for start, end in ranges)
        session.position_nll[cpu] = nll.detach().to("cpu", torch.float64)

    def update(start: int, end: int) -> None:
        if not bool(scored[start:end].all()):
            raise ComplianceError(f"TTT would train on targets [{start}, {end}) before scoring them (C3)")
        session.result.events.append(("update", start, end))
        if on_update is not None:
            on_update(start, end)

    for batch_index, batch in enumerate(batches):
        adapters.reset_b()
        if not config.lora_warm_start and batch_index:
            adapters.reset_a()
        optimizer = torch.optim.AdamW(lora_params, lr=config.lr, betas=(config.momentum, TTT_ADAM_BETA2),
                                      eps=TTT_ADAM_EPS, weight_decay=config.lora_weight_decay)
        ttt_batch(session, adapted, lora_params, optimizer, [spans[d] for d in batch], window, score, update)
        done += batch
        if thresholds and len(done) >= thresholds[0] and batch_index < len(batches) - 1:
            while thresholds and len(done) >= thresholds[0]:
                thresholds.pop(0)
            ttt_phase_sgd(session, base_params, sorted(spans[d] for d in done), update)
            adapters.reset_b()
        session.report_batched(int(scored.sum()))
    adapted.remove()
    if not bool(scored[1:].all()):
        raise ComplianceError(f"batched TTT left {int((~scored[1:]).sum())} targets unscored (C4)")


def ttt_batch(session: TTTSession, adapted: AdaptedModel, params, optimizer, spans, window: int, score, update):
    """One batch of documents, chunk by chunk: score every document's chunk ci, then train on it."""
    config, device = session.config, session.device
    tokens = session.tokens_cpu
    chunk = config.chunk_tokens
    pred_lens = [end - start for start, end in spans]
    num_chunks = [(length + chunk - 1) // chunk for length in pred_lens]
    for ci in range(max(num_chunks)):
        active = [b for b, count in enumerate(num_chunks) if ci < count]
        training = [i for i, b in enumerate(active) if ci < num_chunks[b] - 1]
        context = min((ci + 1) * chunk, window)
        index = torch.zeros(len(active), context + 1, dtype=torch.int64)
        valid = torch.zeros(len(active), context + 1, dtype=torch.bool)
        flat, positions, ranges = [], [], []
        for i, b in enumerate(active):
            origin = spans[b][0] - 1  # the document's BOS (or the stream's first token)
            win_start, win_len, offset, length = chunk_window(ci, pred_lens[b], num_chunks[b], chunk, window)
            index[i, : win_len + 1] = torch.arange(origin + win_start, origin + win_start + win_len + 1)
            valid[i, : win_len + 1] = True
            flat.append(i * context + torch.arange(offset, offset + length))
            first = origin + win_start + offset + 1
            positions.append(torch.arange(first, first + length))
            ranges.append((first, first + length))
        rows_tokens = torch.where(valid, tokens[index].long(), 0).to(device)
        inputs, targets = rows_tokens[:, :-1], rows_tokens[:, 1:]
        rows = torch.tensor(active, device=device)
        train = bool(training) and config.epochs > 0
        model = session.model
        model.train(train)
        began = time.perf_counter()
        with torch.set_grad_enabled(train), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            logits = adapted.logits(inputs, rows)
        flat_index = torch.cat(flat).to(device)
        score(torch.cat(positions), logits.detach().reshape(-1, logits.size(-1))[flat_index], ranges)
        if not train:
            continue
        _, reference_context, offset, _ = chunk_window(ci, (ci + 1) * chunk, ci + 1, chunk, window)
        for i in training:
            b = active[i]
            origin = spans[b][0] - 1
            win_start = max(0, (ci + 1) * chunk - window)
            update(origin + max(win_start, 1), origin + (ci + 1) * chunk + 1)
        mask = torch.zeros(len(active), device=device)
        mask[training] = 1.0
        for epoch in range(config.epochs):
            if epoch:
                with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                    logits = adapted.logits(inputs, rows)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                  reduction="none").view(len(active), context)
            per_doc = nll[:, offset : offset + chunk].mean(dim=-1)
            optimizer.zero_grad(set_to_none=True)
            (per_doc * mask).sum().backward()
            optimizer.step()
            session.result.steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        session.result.train_seconds += time.perf_counter() - began


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
    for index, group in enumerate(groups):
        for param_group in optimizer.param_groups:
            param_group["lr"] = ttt_cosine_lr(config.phase_lr, index, len(groups))
        for _ in range(config.phase_epochs):
            for batch in group:
                optimizer.zero_grad(set_to_none=True)
                session.batch_loss(batch).backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(base_params, config.grad_clip)
                optimizer.step()
                session.result.steps += 1
    for p in base_params:
        p.requires_grad_(False)
    session.result.train_seconds += time.perf_counter() - began


def check_batched_usage(ngram) -> None:
    if ngram:
        raise UsageError("TTT mode batched scores documents out of stream order; the n-gram cache needs the "
                         "stream's order: drop the n-gram grid or pick another TTT mode")
